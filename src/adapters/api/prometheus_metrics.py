"""The API's `MetricRegistry` on prometheus-client, the library the worker's metrics use too.

Each instance keeps its own `CollectorRegistry`, so that two API apps in one process (the tests
make many) count apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from vilaserve.application.api.metrics import (
    CounterMetric,
    GaugeMetric,
    HistogramMetric,
    MetricRegistry,
)

_Wrapper = TypeVar("_Wrapper", bound=MetricWrapperBase)


def _series(metric: _Wrapper, labels: Sequence[str]) -> _Wrapper:
    return metric.labels(*labels) if labels else metric


class _Counter(CounterMetric):
    def __init__(self, metric: Counter) -> None:
        self._metric = metric

    def inc(self, labels: Sequence[str], amount: float = 1.0) -> None:
        _series(self._metric, labels).inc(amount)


class _Gauge(GaugeMetric):
    def __init__(self, metric: Gauge) -> None:
        self._metric = metric

    def add(self, labels: Sequence[str], amount: float) -> None:
        _series(self._metric, labels).inc(amount)


class _Histogram(HistogramMetric):
    def __init__(self, metric: Histogram) -> None:
        self._metric = metric

    def observe(self, labels: Sequence[str], value: float) -> None:
        _series(self._metric, labels).observe(value)


class _WithoutCreatedSeries(Collector):
    """The registry's families less their `_created` samples: the text format would show them
    as one more gauge per counter and histogram, series this API has never exposed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            trimmed = Metric(family.name, family.documentation, family.type, family.unit)
            created = family.name + "_created"
            trimmed.samples = [s for s in family.samples if s.name != created]
            yield trimmed


class PrometheusMetrics(MetricRegistry):
    def __init__(self) -> None:
        self._registry = CollectorRegistry()
        self._exposed = _WithoutCreatedSeries(self._registry)

    def counter(self, name: str, help: str, label_names: Sequence[str]) -> CounterMetric:
        return _Counter(Counter(name, help, label_names, registry=self._registry))

    def gauge(self, name: str, help: str, label_names: Sequence[str]) -> GaugeMetric:
        return _Gauge(Gauge(name, help, label_names, registry=self._registry))

    def histogram(
        self, name: str, help: str, label_names: Sequence[str], buckets: Sequence[float]
    ) -> HistogramMetric:
        metric = Histogram(name, help, label_names, registry=self._registry, buckets=buckets)
        return _Histogram(metric)

    def render(self) -> str:
        return generate_latest(self._exposed).decode("utf-8")
