"""Stop-string detection over streamed text.

Text that could be the beginning of a stop string is held back, so a client never sees half of
"</s>" before the stream ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class StopScan:
    """The part of the buffered text that is safe to emit, and whether a stop string was hit."""

    emit: str
    stopped: bool


class StopStringMatcher:
    """Feeds on text deltas; releases text only when no stop string can still begin in it."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._pending = ""

    def push(self, delta: str) -> StopScan:
        if not self._stop:
            return StopScan(delta, False)
        text = self._pending + delta
        cut = self._earliest_stop(text)
        if cut is not None:
            self._pending = ""
            return StopScan(text[:cut], True)
        keep = self._partial_suffix_length(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return StopScan(text[: len(text) - keep], False)

    def flush(self) -> str:
        """Text held back when the stream ends for another reason: it was not a stop string."""
        rest, self._pending = self._pending, ""
        return rest

    def _earliest_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_suffix_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for size in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0
