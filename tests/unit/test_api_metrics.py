"""The life of one request in the metrics: waiting, running, then closed exactly once."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from vilaserve.adapters.api.prometheus_metrics import PrometheusMetrics
from vilaserve.application.api.metrics import ApiMetrics
from vilaserve.domain.api.openai_responses import ChoiceFinished
from vilaserve.domain.shared.generation import Usage


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sample(metrics: ApiMetrics, name: str, **labels: str) -> float:
    """One sample of the rendered exposition; 0 for a series not shown yet."""
    for family in text_string_to_metric_families(metrics.render()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def test_a_request_moves_from_waiting_to_running_and_closes_once() -> None:
    clock = Clock()
    metrics = ApiMetrics(PrometheusMetrics(), clock)
    meter = metrics.start("m")
    running, waiting = "vilaserve:num_requests_running", "vilaserve:num_requests_waiting"
    assert sample(metrics, waiting, model_name="m") == 1
    assert sample(metrics, running, model_name="m") == 0
    clock.now = 0.5
    meter.text_arrived(0)
    meter.text_arrived(0)
    assert sample(metrics, waiting, model_name="m") == 0
    assert sample(metrics, running, model_name="m") == 1
    clock.now = 1.5
    meter.choice_finished(ChoiceFinished(0, "length", Usage(10, 5)))
    meter.succeeded(Usage(10, 5))
    meter.failed("cancelled")  # the closing hook after a finished request changes nothing
    assert sample(metrics, running, model_name="m") == 0
    success = "vilaserve:request_success_total"
    assert sample(metrics, success, model_name="m", finished_reason="length") == 1
    failure = "vilaserve:request_failure_total"
    assert sample(metrics, failure, model_name="m", error_type="cancelled") == 0
    assert sample(metrics, "vilaserve:prompt_tokens_total", model_name="m") == 10
    assert sample(metrics, "vilaserve:generation_tokens_total", model_name="m") == 5
    ttft = "vilaserve:time_to_first_token_seconds_sum"
    assert sample(metrics, ttft, model_name="m") == 0.5
    tpot = "vilaserve:time_per_output_token_seconds_sum"
    assert sample(metrics, tpot, model_name="m") == 0.25  # 1 s over 4 tokens
    assert sample(metrics, "vilaserve:e2e_request_latency_seconds_count", model_name="m") == 1


def test_a_request_that_fails_before_its_first_token() -> None:
    metrics = ApiMetrics(PrometheusMetrics(), Clock())
    meter = metrics.start("m")
    meter.failed("invalid_request_error")
    assert sample(metrics, "vilaserve:num_requests_waiting", model_name="m") == 0
    failure = "vilaserve:request_failure_total"
    assert sample(metrics, failure, model_name="m", error_type="invalid_request_error") == 1
    ttft = "vilaserve:time_to_first_token_seconds_count"
    assert sample(metrics, ttft, model_name="m") == 0


def test_each_api_metrics_counts_apart() -> None:
    first, second = ApiMetrics(PrometheusMetrics(), Clock()), ApiMetrics(PrometheusMetrics())
    first.start("m").failed("server_error")
    failure = "vilaserve:request_failure_total"
    assert sample(first, failure, model_name="m", error_type="server_error") == 1
    assert sample(second, failure, model_name="m", error_type="server_error") == 0
