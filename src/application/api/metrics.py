"""The API's Prometheus metrics: vLLM's names and `model_name` label under our prefix.

What is measured, and when, is decided here; a `MetricRegistry` (an adapter) keeps the series
and writes the exposition. `num_requests_waiting` counts requests sent to a worker that have no
token yet (queued at the worker or in prefill); `num_requests_running` those streaming tokens.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from vilaserve.domain.api.openai_responses import ChoiceFinished
from vilaserve.domain.shared.generation import Usage


class CounterMetric(ABC):
    @abstractmethod
    def inc(self, labels: Sequence[str], amount: float = 1.0) -> None:
        """Adds `amount` (not negative) to the series of these label values."""


class GaugeMetric(ABC):
    @abstractmethod
    def add(self, labels: Sequence[str], amount: float) -> None:
        """Moves the series of these label values by `amount`, up or down."""


class HistogramMetric(ABC):
    @abstractmethod
    def observe(self, labels: Sequence[str], value: float) -> None: ...


class MetricRegistry(ABC):
    """Series with labels, rendered in Prometheus' text format (0.0.4).

    Label values are given in the order of the metric's label names. A series appears in
    `render()` from its first update, and each metric's HELP and TYPE lines from its creation.
    """

    @abstractmethod
    def counter(self, name: str, help: str, label_names: Sequence[str]) -> CounterMetric:
        """`name` ends in `_total`, as it is exposed."""

    @abstractmethod
    def gauge(self, name: str, help: str, label_names: Sequence[str]) -> GaugeMetric: ...

    @abstractmethod
    def histogram(
        self, name: str, help: str, label_names: Sequence[str], buckets: Sequence[float]
    ) -> HistogramMetric:
        """`buckets`: the finite upper bounds, ascending; `+Inf` is implied."""

    @abstractmethod
    def render(self) -> str:
        """The metrics in the order they were created, newline-terminated."""


PREFIX = "vilaserve:"
TTFT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
TPOT_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class ApiMetrics:
    def __init__(
        self, registry: MetricRegistry, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self._registry = registry
        self._clock = clock
        model = ("model_name",)
        self.request_success = registry.counter(
            PREFIX + "request_success_total",
            "Finished completions (one per choice), by finish reason.",
            ("model_name", "finished_reason"),
        )
        self.request_failure = registry.counter(
            PREFIX + "request_failure_total",
            "Requests that failed after reaching a worker, by OpenAI error type.",
            ("model_name", "error_type"),
        )
        self.prompt_tokens = registry.counter(
            PREFIX + "prompt_tokens_total", "Prompt tokens processed (images included).", model
        )
        self.generation_tokens = registry.counter(
            PREFIX + "generation_tokens_total", "Tokens generated.", model
        )
        self.time_to_first_token = registry.histogram(
            PREFIX + "time_to_first_token_seconds",
            "Seconds from the request's arrival to its first generated text.",
            model,
            TTFT_BUCKETS,
        )
        self.time_per_output_token = registry.histogram(
            PREFIX + "time_per_output_token_seconds",
            "Seconds per generated token after the first, per choice.",
            model,
            TPOT_BUCKETS,
        )
        self.e2e_latency = registry.histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Seconds from the request's arrival to its last token.",
            model,
            E2E_BUCKETS,
        )
        self.running = registry.gauge(
            PREFIX + "num_requests_running", "Requests generating tokens now.", model
        )
        self.waiting = registry.gauge(
            PREFIX + "num_requests_waiting", "Requests waiting for their first token.", model
        )

    def start(self, model: str, started: float | None = None) -> RequestMeter:
        """Meters one request; `started` (from this clock) defaults to now."""
        return RequestMeter(self, model, self._clock, self._clock() if started is None else started)

    def now(self) -> float:
        return self._clock()

    def render(self) -> str:
        return self._registry.render()


class RequestMeter:
    """The life of one request in the metrics: waiting, running, then closed exactly once."""

    def __init__(
        self, metrics: ApiMetrics, model: str, clock: Callable[[], float], started: float
    ) -> None:
        self._metrics = metrics
        self._labels = (model,)
        self._clock = clock
        self._started = started
        self._first_text: dict[int, float] = {}
        self._state = "waiting"
        metrics.waiting.add(self._labels, 1)

    def text_arrived(self, index: int) -> None:
        now = self._clock()
        self._first_text.setdefault(index, now)
        if self._state == "waiting":
            self._metrics.waiting.add(self._labels, -1)
            self._metrics.running.add(self._labels, 1)
            self._metrics.time_to_first_token.observe(self._labels, now - self._started)
            self._state = "running"

    def choice_finished(self, event: ChoiceFinished) -> None:
        model = self._labels[0]
        self._metrics.request_success.inc((model, event.finish_reason))
        tokens = event.usage.completion_tokens
        self._metrics.generation_tokens.inc(self._labels, tokens)
        first = self._first_text.get(event.index)
        if first is not None and tokens > 1:
            per_token = (self._clock() - first) / (tokens - 1)
            self._metrics.time_per_output_token.observe(self._labels, per_token)

    def succeeded(self, usage: Usage) -> None:
        if self._close():
            self._metrics.prompt_tokens.inc(self._labels, usage.prompt_tokens)
            self._metrics.e2e_latency.observe(self._labels, self._clock() - self._started)

    def failed(self, error_type: str) -> None:
        if self._close():
            self._metrics.request_failure.inc((self._labels[0], error_type))

    def _close(self) -> bool:
        if self._state == "closed":
            return False
        gauge = self._metrics.waiting if self._state == "waiting" else self._metrics.running
        gauge.add(self._labels, -1)
        self._state = "closed"
        return True
