"""The engine's figures in Prometheus' format, under vLLM's metric names so that dashboards
written for vLLM read a vilaserve worker unchanged."""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from vilaserve.domain.worker.first_token import FIRST_TOKEN_PARTS, FirstTokenParts

# From 1 ms: a small model's decode step on a CPU takes 4-7 ms, and one of a few hundred
# microseconds is what tells a user the step is not where the time goes.
_LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.02, 0.04, 0.06, 0.08,
                    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)  # fmt: skip
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# The parts of a time to first token: a greedy sample is a millisecond, a queue behind a burst
# of pictures on a CPU or a long prompt's prefill can take minutes.
_PART_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 20.0, 40.0, 60.0, 120.0)  # fmt: skip


class HitCounting(Protocol):
    hits: int
    misses: int


class _ImageCacheCollector(Collector):
    def __init__(self, cache: HitCounting) -> None:
        self._cache = cache

    def collect(self):  # type: ignore[no-untyped-def]
        queries = CounterMetricFamily(
            "vllm:mm_cache_queries", "Images looked up in the image embedding cache"
        )
        queries.add_metric([], self._cache.hits + self._cache.misses)
        hits = CounterMetricFamily("vllm:mm_cache_hits", "Images found in the cache")
        hits.add_metric([], self._cache.hits)
        return [queries, hits]


class PrometheusEngineObserver:
    """Implements the engine's `EngineObserver`; `render()` is the /metrics body."""

    def __init__(self, image_cache: HitCounting | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._running = Gauge("vllm:num_requests_running", "Sequences in the batch", registry=r)
        self._waiting = Gauge("vllm:num_requests_waiting", "Sequences waiting", registry=r)
        self._kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache rows in use (0-1)", registry=r)
        self._prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt positions looked up in the prefix cache",
            registry=r,
        )  # fmt: skip
        self._prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt positions reused from the prefix cache", registry=r
        )
        self._prompt_tokens = Counter("vllm:prompt_tokens", "Prompt positions", registry=r)
        self._generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", registry=r)
        self._success = Counter(
            "vllm:request_success", "Finished requests", ["finished_reason"], registry=r
        )
        self._step_tokens = Histogram(
            "vllm:iteration_tokens_total", "Positions computed per engine step",
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self._step_seconds = Histogram(
            "vilaserve:engine_step_seconds", "Wall time of one engine step",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds", "From arrival in the engine to the first token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._itl = Histogram(
            "vllm:inter_token_latency_seconds", "Between two tokens of one stream",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._ttft_parts = Histogram(
            "vilaserve:first_token_part_seconds",
            "Where each request's time to first token went: " + ", ".join(FIRST_TOKEN_PARTS),
            ["part"], buckets=_PART_BUCKETS, registry=r,
        )  # fmt: skip
        # Each part is on the page from the start (zero counts), not from its first request.
        self._by_part = {part: self._ttft_parts.labels(part=part) for part in FIRST_TOKEN_PARTS}
        if image_cache is not None:
            r.register(_ImageCacheCollector(image_cache))

    def step(self, *, tokens: int, decodes: int, seconds: float) -> None:
        self._step_tokens.observe(tokens)
        self._step_seconds.observe(seconds)
        self._generation_tokens.inc(decodes)

    def load(self, *, running: int, waiting: int, kv_usage: float) -> None:
        self._running.set(running)
        self._waiting.set(waiting)
        self._kv.set(kv_usage)

    def admitted(self, *, prompt_tokens: int, reused_tokens: int) -> None:
        self._prompt_tokens.inc(prompt_tokens)
        self._prefix_queries.inc(prompt_tokens)
        self._prefix_hits.inc(reused_tokens)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)
        self._generation_tokens.inc()

    def first_token_parts(self, parts: FirstTokenParts) -> None:
        for part, seconds in parts.by_name().items():
            self._by_part[part].observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def finished(self, *, reason: str, generated: int) -> None:
        self._success.labels(finished_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
