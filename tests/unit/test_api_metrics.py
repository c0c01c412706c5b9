"""The Prometheus registry's text format and the life of one request in the metrics."""

from __future__ import annotations

from vilaserve.application.api.metrics import ApiMetrics
from vilaserve.application.api.metrics_registry import Counter, Gauge, Histogram, render
from vilaserve.domain.api.openai_responses import ChoiceFinished
from vilaserve.domain.shared.generation import Usage


def test_text_exposition() -> None:
    counter = Counter("x:requests_total", "Requests.", ("model_name",))
    counter.inc(("a",))
    counter.inc(('we"ird\\\n',), 2.5)
    gauge = Gauge("x:running", "Running.", ())
    gauge.add((), 3)
    histogram = Histogram("x:latency_seconds", "Latency.", ("model_name",), (0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 7.0):
        histogram.observe(("a",), value)
    assert render([counter, gauge, histogram]).splitlines() == [
        "# HELP x:requests_total Requests.",
        "# TYPE x:requests_total counter",
        'x:requests_total{model_name="a"} 1',
        'x:requests_total{model_name="we\\"ird\\\\\\n"} 2.5',
        "# HELP x:running Running.",
        "# TYPE x:running gauge",
        "x:running 3",
        "# HELP x:latency_seconds Latency.",
        "# TYPE x:latency_seconds histogram",
        'x:latency_seconds_bucket{model_name="a",le="0.1"} 2',
        'x:latency_seconds_bucket{model_name="a",le="1"} 3',
        'x:latency_seconds_bucket{model_name="a",le="+Inf"} 4',
        'x:latency_seconds_sum{model_name="a"} 7.65',
        'x:latency_seconds_count{model_name="a"} 4',
    ]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_request_moves_from_waiting_to_running_and_closes_once() -> None:
    clock = Clock()
    metrics = ApiMetrics(clock)
    labels = ("m",)
    meter = metrics.start("m")
    assert metrics.waiting.get(labels) == 1 and metrics.running.get(labels) == 0
    clock.now = 0.5
    meter.text_arrived(0)
    meter.text_arrived(0)
    assert metrics.waiting.get(labels) == 0 and metrics.running.get(labels) == 1
    clock.now = 1.5
    meter.choice_finished(ChoiceFinished(0, "length", Usage(10, 5)))
    meter.succeeded(Usage(10, 5))
    meter.failed("cancelled")  # the closing hook after a finished request changes nothing
    assert metrics.running.get(labels) == 0
    assert metrics.request_success.get(("m", "length")) == 1
    assert metrics.request_failure.get(("m", "cancelled")) == 0
    assert metrics.prompt_tokens.get(labels) == 10
    assert metrics.generation_tokens.get(labels) == 5
    assert metrics.time_to_first_token.series[labels].total == 0.5
    assert metrics.time_per_output_token.series[labels].total == 0.25  # 1 s over 4 tokens
    assert metrics.e2e_latency.count(labels) == 1


def test_a_request_that_fails_before_its_first_token() -> None:
    metrics = ApiMetrics(Clock())
    meter = metrics.start("m")
    meter.failed("invalid_request_error")
    assert metrics.waiting.get(("m",)) == 0
    assert metrics.request_failure.get(("m", "invalid_request_error")) == 1
    assert metrics.time_to_first_token.count(("m",)) == 0
