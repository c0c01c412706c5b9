"""The KV cache's rows, and the prefixes they still hold after their sequence left.

A finished sequence leaves its keys/values in its cache row. A new sequence takes the free row
whose cached prefix agrees longest with its own prompt and starts computing after it (turn 2
of a chat reuses turn 1's prompt and answer); failing a match, the least recently freed row,
whose prefix is then forgotten. So the prefix cache is exactly the free rows' contents:
evicted under pressure by construction, and a row in use is never shared.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from vilaserve.domain.worker.batch import PositionKey


def common_prefix(a: Sequence[PositionKey], b: Sequence[PositionKey]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class CacheRows:
    """Which of the KV cache's `num_rows` rows are free, and what each free one holds."""

    def __init__(self, num_rows: int) -> None:
        if num_rows < 1:
            raise ValueError(f"need at least one KV-cache row, got {num_rows}")
        self.num_rows = num_rows
        # Free rows, least recently freed first, with the keys their KV still holds.
        self._free: OrderedDict[int, list[PositionKey]] = OrderedDict(
            (row, []) for row in range(num_rows)
        )

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        return self.num_rows - len(self._free)

    def acquire(self, keys: Sequence[PositionKey]) -> tuple[int, int] | None:
        """A free row for a prompt with `keys`, and how many leading positions it already
        holds (at most len(keys) - 1: the last prompt position is always computed, to sample
        from). None when every row is in use."""
        if not self._free:
            return None
        best_row, best = next(iter(self._free)), 0
        for row, cached in self._free.items():
            if cached and cached[0] == keys[0]:
                n = common_prefix(cached, keys)
                if n > best:
                    best_row, best = row, n
        del self._free[best_row]
        return best_row, min(best, len(keys) - 1)

    def release(self, row: int, cached: list[PositionKey]) -> None:
        """Gives `row` back; `cached` are the keys of the KV it holds ([] to forget it)."""
        if row in self._free or not 0 <= row < self.num_rows:
            raise ValueError(f"cache row {row} is not in use")
        self._free[row] = cached
