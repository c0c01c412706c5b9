"""Gives memory back to the system after a request with a large body.

A large body (a long prompt, pictures) is read, parsed and dropped within one request, but
glibc's malloc keeps what it freed for reuse: a worker that once took a 20 MB prompt kept
3.75 GB resident. After each request whose body was larger than `threshold` bytes, this
middleware asks malloc to return its free pages (`malloc_trim(0)`), on a thread so the event
loop does not wait, and at most once per `min_interval_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_THRESHOLD_BYTES = 1024 * 1024


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's `malloc_trim(0)`, or None where there is none (musl, macOS)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
        trim.argtypes = [ctypes.c_size_t]
        return lambda: trim(0)
    return None


class ReleaseMemoryAfterLargeBodies:
    def __init__(
        self,
        app: ASGIApp,
        threshold: int = DEFAULT_THRESHOLD_BYTES,
        min_interval_s: float = 1.0,
    ) -> None:
        self.app = app
        self._threshold = threshold
        self._min_interval_s = min_interval_s
        self._trim = _malloc_trim()
        self._last = 0.0
        self._pending = False
        self._task: asyncio.Task[None] | None = None  # held: the loop keeps weak references

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._trim is None:
            await self.app(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        try:
            await self.app(scope, counting_receive, send)
        finally:
            if received > self._threshold:
                self._schedule()

    def _schedule(self) -> None:
        if self._pending:
            return
        self._pending = True
        delay = max(0.0, self._last + self._min_interval_s - time.monotonic())
        asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> None:
        self._task = asyncio.ensure_future(self._release())

    async def _release(self) -> None:
        try:
            assert self._trim is not None
            await asyncio.to_thread(self._trim)
        finally:
            self._last = time.monotonic()
            self._pending = False
