"""Counters, gauges and histograms with labels, exposed in Prometheus' text format (0.0.4).

Small and dependency-free on purpose: the API needs a dozen series, not a client library.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


@dataclass
class _Metric:
    name: str
    help: str
    label_names: tuple[str, ...]
    kind: ClassVar[str] = ""

    def _key(self, labels: Sequence[str]) -> LabelValues:
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {labels}")
        return tuple(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


@dataclass
class Counter(_Metric):
    kind: ClassVar[str] = "counter"
    values: dict[LabelValues, float] = field(default_factory=dict)

    def inc(self, labels: Sequence[str], amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, labels: Sequence[str]) -> float:
        return self.values.get(tuple(labels), 0.0)

    def lines(self) -> list[str]:
        return [
            f"{self.name}{_labels(self.label_names, k)} {_format_number(v)}"
            for k, v in sorted(self.values.items())
        ]


@dataclass
class Gauge(_Metric):
    kind: ClassVar[str] = "gauge"
    values: dict[LabelValues, float] = field(default_factory=dict)

    def add(self, labels: Sequence[str], amount: float) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, labels: Sequence[str]) -> float:
        return self.values.get(tuple(labels), 0.0)

    def lines(self) -> list[str]:
        return [
            f"{self.name}{_labels(self.label_names, k)} {_format_number(v)}"
            for k, v in sorted(self.values.items())
        ]


@dataclass
class _HistogramSeries:
    bucket_counts: list[int]
    total: float = 0.0
    count: int = 0


@dataclass
class Histogram(_Metric):
    buckets: tuple[float, ...] = ()
    kind: ClassVar[str] = "histogram"
    series: dict[LabelValues, _HistogramSeries] = field(default_factory=dict)

    def observe(self, labels: Sequence[str], value: float) -> None:
        key = self._key(labels)
        entry = self.series.setdefault(key, _HistogramSeries([0] * len(self.buckets)))
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.buckets):
            entry.bucket_counts[index] += 1
        entry.total += value
        entry.count += 1

    def count(self, labels: Sequence[str]) -> int:
        entry = self.series.get(tuple(labels))
        return entry.count if entry else 0

    def lines(self) -> list[str]:
        out: list[str] = []
        for key, entry in sorted(self.series.items()):
            cumulative = 0
            for bound, n in zip(self.buckets, entry.bucket_counts, strict=True):
                cumulative += n
                le = f'le="{_format_number(bound)}"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {cumulative}")
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.label_names, key, inf)} {entry.count}")
            labels = _labels(self.label_names, key)
            out.append(f"{self.name}_sum{labels} {_format_number(entry.total)}")
            out.append(f"{self.name}_count{labels} {entry.count}")
        return out


Metric = Counter | Gauge | Histogram


def render(metrics: Sequence[Metric]) -> str:
    """The text exposition of `metrics`, one HELP/TYPE header each, newline-terminated."""
    lines: list[str] = []
    for metric in metrics:
        lines += metric.header() + metric.lines()
    return "\n".join(lines) + "\n"
