"""Structured logs: one JSON object per line, with the `extra=` fields of each record.

Image payloads never reach a log record: the application logs counts and sizes only.

A warning or error repeated in a burst (a flood of bad clients, accept() failing on "Too
many open files") is written a few times per interval, then summed up in one line: a log that
grows by megabytes a minute hides everything else and fills the disk.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REPEAT_LIMIT = 10  # lines of one kind per interval
REPEAT_INTERVAL_S = 60.0

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


@dataclass
class _Window:
    key: tuple[str, int, str]
    started: float
    passed: int = 1
    suppressed: int = 0


class RepeatedLineFilter(logging.Filter):
    """At most `limit` records of one logger, level and message (its first line, before the
    arguments are filled in) per `interval_s`, from `min_level` up; the rest are counted, and
    once the interval is over one line says how many were left out.

    That line goes to `emit` (the handler's `handle`) on the next record to arrive, of any
    kind, or at exit. Records below `min_level` (access logs, progress) all pass."""

    def __init__(
        self,
        emit: Callable[[logging.LogRecord], object],
        limit: int = REPEAT_LIMIT,
        interval_s: float = REPEAT_INTERVAL_S,
        min_level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = 4096,
    ) -> None:
        super().__init__()
        self._emit = emit
        self._limit = limit
        self._interval_s = interval_s
        self._min_level = min_level
        self._clock = clock
        self._max_kinds = max_kinds  # distinct messages tracked (oldest dropped beyond)
        # By start, oldest first: a new window is only ever appended.
        self._windows: OrderedDict[tuple[str, int, str], _Window] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self._min_level or hasattr(record, "suppressed_lines"):
            return True
        key = (record.name, record.levelno, str(record.msg).split("\n", 1)[0][:200])
        now = self._clock()
        with self._lock:
            ended = self._end_windows(now)
            window = self._windows.get(key)
            if window is None:
                self._windows[key] = _Window(key, now)
                allowed = True
            elif window.passed < self._limit:
                window.passed += 1
                allowed = True
            else:
                window.suppressed += 1
                allowed = False
        self._summarize(ended)
        return allowed

    def close(self) -> None:
        """Sum up the windows still open (at exit)."""
        with self._lock:
            ended = list(self._windows.values())
            self._windows.clear()
        self._summarize(ended)

    def _end_windows(self, now: float) -> list[_Window]:
        ended = []
        while self._windows:
            oldest = next(iter(self._windows.values()))
            if now - oldest.started < self._interval_s and len(self._windows) < self._max_kinds:
                break
            ended.append(self._windows.popitem(last=False)[1])
        return ended

    def _summarize(self, windows: list[_Window]) -> None:
        for window in windows:
            if window.suppressed:
                name, level, first_line = window.key
                summary = logging.LogRecord(
                    name,
                    level,
                    __file__,
                    0,
                    "%d similar lines suppressed in %.0f s: %s",
                    (window.suppressed, self._interval_s, first_line),
                    None,
                )
                summary.suppressed_lines = window.suppressed
                self._emit(summary)


_repeats: RepeatedLineFilter | None = None  # the installed one, summed up at exit


def configure_logging(
    fmt: str = "json",
    level: int = logging.INFO,
    repeat_limit: int = REPEAT_LIMIT,
    repeat_interval_s: float = REPEAT_INTERVAL_S,
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # On the handler, so it sees every logger's records, uvicorn's and asyncio's included.
    repeats = RepeatedLineFilter(handler.handle, repeat_limit, repeat_interval_s)
    handler.addFilter(repeats)
    global _repeats
    if _repeats is not None:
        atexit.unregister(_repeats.close)
    _repeats = repeats
    atexit.register(repeats.close)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's own logging config (had it run in this process) gives its loggers handlers of
    # their own and stops them propagating: they would escape the format and the limit.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # httpx logs every request at INFO: heartbeats and status polls would flood the log.
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
