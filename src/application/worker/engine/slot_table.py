"""KV-cache slots and the prefixes they still hold after their sequence left.

A finished sequence leaves its keys/values in its slot. A new sequence takes the free slot
whose cached prefix agrees longest with its own prompt and starts computing after it (turn 2
of a chat reuses turn 1's prompt and answer); failing a match, the least recently freed slot,
whose prefix is then forgotten. So the prefix cache is exactly the free slots' contents:
evicted under pressure by construction, and a slot in use is never shared.
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


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"need at least one KV-cache slot, got {num_slots}")
        self.num_slots = num_slots
        # Free slots, least recently freed first, with the keys their KV still holds.
        self._free: OrderedDict[int, list[PositionKey]] = OrderedDict(
            (slot, []) for slot in range(num_slots)
        )

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        return self.num_slots - len(self._free)

    def acquire(self, keys: Sequence[PositionKey]) -> tuple[int, int] | None:
        """A free slot for a prompt with `keys`, and how many leading positions it already
        holds (at most len(keys) - 1: the last prompt position is always computed, to sample
        from). None when every slot is in use."""
        if not self._free:
            return None
        best_slot, best = next(iter(self._free)), 0
        for slot, cached in self._free.items():
            if cached and cached[0] == keys[0]:
                n = common_prefix(cached, keys)
                if n > best:
                    best_slot, best = slot, n
        del self._free[best_slot]
        return best_slot, min(best, len(keys) - 1)

    def release(self, slot: int, cached: list[PositionKey]) -> None:
        """Gives `slot` back; `cached` are the keys of the KV it holds ([] to forget it)."""
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not in use")
        self._free[slot] = cached
