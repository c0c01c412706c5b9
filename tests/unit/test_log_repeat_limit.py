"""The log's repeat limit (hardening finding 8): a warning repeated in a burst is written a few
times per interval and then summed up in one line; other lines are untouched. Also: the
connection limit fitted to the process' file limit."""

from __future__ import annotations

import io
import json
import logging
import logging.config
from collections.abc import Iterator

import pytest
import uvicorn.config

from vilaserve.entrypoints.shared import http_server
from vilaserve.entrypoints.shared.http_server import HttpLimits, fit_to_file_limit
from vilaserve.entrypoints.shared.logging_setup import RepeatedLineFilter, configure_logging


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(
    msg: str, *args: object, name: str = "uvicorn.error", level: int = logging.WARNING
) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


Limited = tuple[RepeatedLineFilter, list[logging.LogRecord], Clock]


@pytest.fixture
def limited() -> Limited:
    summaries: list[logging.LogRecord] = []
    clock = Clock()
    return (
        RepeatedLineFilter(summaries.append, limit=3, interval_s=10, clock=clock),
        summaries,
        clock,
    )


def test_a_burst_passes_the_limit_then_one_line_sums_up_the_rest(limited: Limited) -> None:
    repeats, summaries, clock = limited
    passed = [repeats.filter(record("Invalid HTTP request received.")) for _ in range(50)]
    assert passed == [True] * 3 + [False] * 47
    assert summaries == []  # the interval is not over yet

    clock.now += 10
    assert repeats.filter(record("Invalid HTTP request received."))  # a new interval
    (summary,) = summaries
    assert (
        summary.getMessage()
        == "47 similar lines suppressed in 10 s: Invalid HTTP request received."
    )
    assert (summary.name, summary.levelno) == ("uvicorn.error", logging.WARNING)
    assert summary.suppressed_lines == 47  # type: ignore[attr-defined]
    assert repeats.filter(summary), "the summary itself is never held back"


def test_the_summary_comes_with_any_later_line_or_at_exit(limited: Limited) -> None:
    repeats, summaries, clock = limited
    for _ in range(5):
        repeats.filter(
            record("socket.accept() out of system resource\nsocket: <fd=5>", name="asyncio")
        )
    clock.now += 11
    assert repeats.filter(record("something else", name="vilaserve"))
    assert [s.getMessage() for s in summaries] == [
        "2 similar lines suppressed in 10 s: socket.accept() out of system resource"
    ]

    summaries.clear()
    for _ in range(4):
        repeats.filter(record("again"))
    repeats.close()
    assert [s.getMessage() for s in summaries] == ["1 similar lines suppressed in 10 s: again"]


def test_kinds_are_counted_apart_and_arguments_do_not_make_a_new_kind(limited: Limited) -> None:
    repeats, _, _ = limited
    for port in range(3):
        assert repeats.filter(record("closed a connection from %s", f"10.0.0.1:{port}"))
    assert not repeats.filter(record("closed a connection from %s", "10.0.0.9:1"))
    assert repeats.filter(record("closed a connection from %s", "x", name="other.logger"))
    assert repeats.filter(record("closed a connection from %s", "x", level=logging.ERROR))


def test_lines_below_warning_are_never_held_back(limited: Limited) -> None:
    repeats, summaries, _ = limited
    access = '%s - "%s %s HTTP/%s" %d'
    assert all(repeats.filter(record(access, level=logging.INFO)) for _ in range(100))
    assert summaries == []


@pytest.fixture
def root_logging() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        yield stream
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_configure_logging_limits_every_logger(
    root_logging: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As after any uvicorn server that configured its own logging in this process (the test
    # servers do): its loggers had handlers of their own and did not propagate.
    logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)
    monkeypatch.setattr("sys.stderr", root_logging)
    configure_logging("json", repeat_limit=2, repeat_interval_s=60)
    for name in ("asyncio", "uvicorn.error", "vilaserve.entrypoints.shared.http_server"):
        for _ in range(20):
            logging.getLogger(name).error("Too many open files")
    lines = [json.loads(line) for line in root_logging.getvalue().splitlines()]
    assert [line["logger"] for line in lines] == ["asyncio"] * 2 + ["uvicorn.error"] * 2 + [
        "vilaserve.entrypoints.shared.http_server"
    ] * 2


def test_the_connection_limit_fits_the_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = HttpLimits(max_connections=512)
    monkeypatch.setattr(http_server.resource, "getrlimit", lambda _: (1024, 4096))
    raised: list[tuple[int, int]] = []
    monkeypatch.setattr(http_server.resource, "setrlimit", lambda _, value: raised.append(value))
    assert fit_to_file_limit(limits) == limits  # the soft limit raised to what it needs
    assert raised == [(http_server.FDS_PER_CONNECTION * 512 + http_server.FD_RESERVE, 4096)]

    monkeypatch.setattr(http_server.resource, "getrlimit", lambda _: (256, 256))
    per_connection = http_server.FDS_PER_CONNECTION
    assert (
        fit_to_file_limit(limits).max_connections
        == (256 - http_server.FD_RESERVE) // per_connection
    )
