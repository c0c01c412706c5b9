"""The worker's engine figures on /metrics resolve a small model's CPU decode steps."""

from __future__ import annotations

import re

from vilaserve.adapters.worker.engine_metrics import PrometheusEngineObserver


def bucket_counts(text: str, name: str) -> dict[float, float]:
    pattern = rf'^{re.escape(name)}_bucket{{le="([^"]+)"}} (\S+)$'
    return {
        float(le): float(count)
        for le, count in re.findall(pattern, text, re.MULTILINE)
        if le != "+Inf"
    }


def test_steps_of_a_few_milliseconds_land_in_different_buckets() -> None:
    observer = PrometheusEngineObserver()
    for seconds in (0.0015, 0.0035, 0.0065):  # a tiny step, and two decode steps of SmolLM2
        observer.step(tokens=1, decodes=1, seconds=seconds)
        observer.inter_token(seconds)
    text = observer.render().decode()
    for name in ("vilaserve:engine_step_seconds", "vllm:inter_token_latency_seconds"):
        counts = bucket_counts(text, name)
        assert counts[0.002] == 1 and counts[0.004] == 2 and counts[0.0075] == 3, name
