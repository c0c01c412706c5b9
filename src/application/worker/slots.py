"""A bound on how many generations run at once, and a count of who is waiting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from vilaserve.domain.shared.errors import EngineOverloaded


class ConcurrencySlots:
    """`limit` requests run; up to `max_waiting` more wait in line; the rest are refused.

    `queue_length` is what FastChat and TinyChat report: running plus waiting.
    """

    def __init__(self, limit: int, max_waiting: int | None = None) -> None:
        if limit < 1:
            raise ValueError(f"the concurrency limit must be >= 1, got {limit}")
        self._limit = limit
        self._max_waiting = max_waiting
        self._semaphore = asyncio.Semaphore(limit)
        self._running = 0
        self._waiting = 0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def queue_length(self) -> int:
        return self._running + self._waiting

    def _is_full(self) -> bool:
        if self._max_waiting is None or self._running < self._limit:
            return False
        return self._waiting >= self._max_waiting

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        if self._is_full():
            raise EngineOverloaded(
                f"the worker is busy: {self._running} requests running and "
                f"{self._waiting} waiting (limit {self._max_waiting}); retry later"
            )
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1
            self._semaphore.release()
