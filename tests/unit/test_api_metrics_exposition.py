"""The API's /metrics body after a fixed history of requests: every family's name, type and
HELP text, every sample's labels and value.

Samples are compared after parsing, so that the renderer may order lines and labels and format
numbers as it likes (`1` or `1.0`, `le="1"` or `le="1.0"`), but not change what they say.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from prometheus_client.parser import text_string_to_metric_families

from vilaserve.adapters.api.prometheus_metrics import PrometheusMetrics
from vilaserve.application.api.metrics import ApiMetrics
from vilaserve.domain.api.openai_responses import ChoiceFinished
from vilaserve.domain.shared.generation import Usage

M = "m"
ODD = 'odd "name" \\ with\na newline'  # label values are escaped, then read back intact

TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
        160.0, 640.0)  # fmt: skip
TPOT = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
        10.0)  # fmt: skip
E2E = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0)

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def api_metrics(clock: Callable[[], float]) -> ApiMetrics:
    return ApiMetrics(PrometheusMetrics(), clock)


def play_history(metrics: ApiMetrics, clock: Clock) -> None:
    # Two choices that stream, finish by different reasons and close the request.
    a = metrics.start(M)
    clock.now = 0.25
    a.text_arrived(0)
    clock.now = 0.5
    a.text_arrived(1)
    a.text_arrived(0)
    clock.now = 1.25
    a.choice_finished(ChoiceFinished(0, "stop", Usage(12, 5)))
    clock.now = 2.0
    a.choice_finished(ChoiceFinished(1, "length", Usage(12, 4)))
    a.succeeded(Usage(12, 9))
    # Refused before its first token; started earlier than the meter was made.
    b = metrics.start(M, started=1.0)
    clock.now = 2.5
    b.failed("invalid_request_error")
    # One token, then the client goes away: the late success changes nothing.
    clock.now = 3.0
    c = metrics.start(M)
    clock.now = 3.1
    c.text_arrived(0)
    clock.now = 3.2
    c.choice_finished(ChoiceFinished(0, "stop", Usage(7, 1)))
    c.failed("cancelled")
    c.succeeded(Usage(7, 1))
    # Another model: one request still waiting, one still running.
    clock.now = 4.0
    metrics.start(ODD)
    e = metrics.start(ODD)
    clock.now = 4.5
    e.text_arrived(0)
    e.choice_finished(ChoiceFinished(3, "stop", Usage(5, 0)))  # a choice with no text seen
    # A worker failure reported twice; the second report and a success change nothing.
    clock.now = 5.0
    f = metrics.start(M)
    f.failed("server_error")
    f.failed("server_error")
    f.succeeded(Usage(1, 1))
    # Slower than every finite bucket.
    g = metrics.start(M)
    clock.now = 705.0
    g.text_arrived(0)
    g.choice_finished(ChoiceFinished(0, "stop", Usage(3, 0)))
    clock.now = 1005.0
    g.succeeded(Usage(3, 0))


def labels(**pairs: str) -> Labels:
    return frozenset(pairs.items())


def histogram(
    name: str, model: str, bounds: Sequence[float], observations: Sequence[float]
) -> Samples:
    out: Samples = {}
    for bound in (*bounds, math.inf):
        hits = sum(1 for value in observations if value <= bound)
        out[(name + "_bucket", labels(model_name=model, le=str(bound)))] = hits
    out[(name + "_sum", labels(model_name=model))] = sum(observations)
    out[(name + "_count", labels(model_name=model))] = len(observations)
    return out


P = "vilaserve:"
EXPECTED_FAMILIES: dict[str, tuple[str, str, Samples]] = {
    P + "request_success_total": (
        "counter",
        "Finished completions (one per choice), by finish reason.",
        {
            (P + "request_success_total", labels(model_name=M, finished_reason="stop")): 3,
            (P + "request_success_total", labels(model_name=M, finished_reason="length")): 1,
            (P + "request_success_total", labels(model_name=ODD, finished_reason="stop")): 1,
        },
    ),
    P + "request_failure_total": (
        "counter",
        "Requests that failed after reaching a worker, by OpenAI error type.",
        {
            (P + "request_failure_total", labels(model_name=M, error_type=kind)): 1
            for kind in ("invalid_request_error", "cancelled", "server_error")
        },
    ),
    P + "prompt_tokens_total": (
        "counter",
        "Prompt tokens processed (images included).",
        {(P + "prompt_tokens_total", labels(model_name=M)): 12 + 3},
    ),
    P + "generation_tokens_total": (
        "counter",
        "Tokens generated.",
        {
            (P + "generation_tokens_total", labels(model_name=M)): 5 + 4 + 1 + 0,
            (P + "generation_tokens_total", labels(model_name=ODD)): 0,
        },
    ),
    P + "time_to_first_token_seconds": (
        "histogram",
        "Seconds from the request's arrival to its first generated text.",
        histogram(P + "time_to_first_token_seconds", M, TTFT, [0.25, 3.1 - 3.0, 700.0])
        | histogram(P + "time_to_first_token_seconds", ODD, TTFT, [0.5]),
    ),
    P + "time_per_output_token_seconds": (
        "histogram",
        "Seconds per generated token after the first, per choice.",
        histogram(P + "time_per_output_token_seconds", M, TPOT, [1.0 / 4, 1.5 / 3]),
    ),
    P + "e2e_request_latency_seconds": (
        "histogram",
        "Seconds from the request's arrival to its last token.",
        histogram(P + "e2e_request_latency_seconds", M, E2E, [2.0, 1000.0]),
    ),
    P + "num_requests_running": (
        "gauge",
        "Requests generating tokens now.",
        {
            (P + "num_requests_running", labels(model_name=M)): 0,
            (P + "num_requests_running", labels(model_name=ODD)): 1,
        },
    ),
    P + "num_requests_waiting": (
        "gauge",
        "Requests waiting for their first token.",
        {
            (P + "num_requests_waiting", labels(model_name=M)): 0,
            (P + "num_requests_waiting", labels(model_name=ODD)): 1,
        },
    ),
}


def normalised(sample_labels: dict[str, str]) -> Labels:
    """A bucket's bound as the float it stands for: `1`, `1.0` and `1e0` are one bound."""
    return frozenset(
        (name, str(float(value)) if name == "le" else value)
        for name, value in sample_labels.items()
    )


def rendered() -> str:
    clock = Clock()
    metrics = api_metrics(clock)
    play_history(metrics, clock)
    return metrics.render()


def test_every_family_sample_and_value_after_a_fixed_history() -> None:
    families = {family.name: family for family in text_string_to_metric_families(rendered())}
    # The parser names a counter's family without its `_total`.
    seen = {
        family.name + ("_total" if family.type == "counter" else ""): (
            family.type,
            family.documentation,
            {(s.name, normalised(s.labels)): s.value for s in family.samples},
        )
        for family in families.values()
    }
    expected = {
        name: (kind, text, {(n, normalised(dict(ls))): v for (n, ls), v in samples.items()})
        for name, (kind, text, samples) in EXPECTED_FAMILIES.items()
    }
    assert seen.keys() == expected.keys()
    for name in expected:
        assert seen[name] == expected[name], name


def test_help_and_type_lines_name_each_family_once() -> None:
    headers = [line for line in rendered().splitlines() if line.startswith("#")]
    expected = []
    for name, (kind, text, _) in EXPECTED_FAMILIES.items():
        expected += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
    assert sorted(headers) == sorted(expected)
    assert len(headers) == len(set(headers))


def test_a_fresh_registry_shows_only_headers() -> None:
    """No series before its first event: a model appears on /metrics with its first request."""
    text = api_metrics(Clock()).render()
    assert [line for line in text.splitlines() if not line.startswith("#")] == []
