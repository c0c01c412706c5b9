"""The worker's engine figures on /metrics resolve a small model's CPU decode steps."""

from __future__ import annotations

import re

from vilaserve.adapters.worker.engine_metrics import PrometheusEngineObserver
from vilaserve.domain.worker.first_token import FIRST_TOKEN_PARTS, FirstTokenParts


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


def test_first_token_parts_are_one_histogram_labelled_by_part() -> None:
    observer = PrometheusEngineObserver()
    parts = FirstTokenParts(
        queue_s=0.0005,
        image_decode_s=0.03,
        vision_tower_s=0.4,
        projector_s=0.004,
        prefill_s=90.0,
        first_sample_s=0.0009,
    )
    observer.first_token_parts(parts)
    text = observer.render().decode()
    name = "vilaserve:first_token_part_seconds"
    expected = {  # each part in the smallest bucket that holds it: 1 ms to 2 minutes
        "queue": 0.001,
        "image_decode": 0.05,
        "vision_tower": 0.5,
        "projector": 0.005,
        "prefill": 120.0,
        "first_sample": 0.001,
    }
    assert set(expected) == set(FIRST_TOKEN_PARTS)
    for part, bucket in expected.items():
        assert f'{name}_count{{part="{part}"}} 1.0' in text, part
        pattern = rf'^{re.escape(name)}_bucket{{le="([^"]+)",part="{part}"}} (\S+)$'
        counts = {float(le): float(n) for le, n in re.findall(pattern, text, re.MULTILINE)}
        assert min(le for le, n in counts.items() if n == 1.0) == bucket, part
