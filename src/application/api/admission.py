"""A bound on the requests the API holds at once; beyond it clients get a 429 to retry."""

from __future__ import annotations

from vilaserve.domain.api.errors import Overloaded


class Admission:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the request limit must be >= 1, got {limit}")
        self._limit = limit
        self._active = 0

    @property
    def active(self) -> int:
        return self._active

    def enter(self) -> None:
        if self._active >= self._limit:
            raise Overloaded(
                f"the server is handling {self._active} requests, its limit; retry later"
            )
        self._active += 1

    def leave(self) -> None:
        self._active = max(0, self._active - 1)
