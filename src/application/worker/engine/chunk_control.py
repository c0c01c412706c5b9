"""How many prompt positions a step may prefill while other streams decode.

A prefill chunk makes its step slower for every running stream. The controller keeps a step
with a chunk within `max_slowdown` times a decode-only step (an average of recent ones), so the
streams' inter-token latency stays bounded whatever the device: it shrinks the chunk when a
mixed step overran and grows it while there is room (multiplicative decrease, gentler
increase), between 1 and `max_chunk` positions. With nothing decoding there is nobody to slow
down and the scheduler prefills up to its token budget.
"""

from __future__ import annotations


class ChunkController:
    def __init__(self, max_chunk: int, max_slowdown: float, initial: int = 64) -> None:
        if max_chunk < 1 or max_slowdown <= 1.0:
            raise ValueError("need max_chunk >= 1 and max_slowdown > 1")
        self.max_chunk = max_chunk
        self.max_slowdown = max_slowdown
        self._chunk = float(min(initial, max_chunk))
        self._decode_step_s: float | None = None

    @property
    def chunk(self) -> int:
        return max(1, int(self._chunk))

    def observe(self, seconds: float, decodes: int, prefill_tokens: int) -> None:
        if decodes == 0:
            return  # a prefill-only step slows nobody down
        if prefill_tokens == 0:
            previous = self._decode_step_s
            self._decode_step_s = seconds if previous is None else 0.8 * previous + 0.2 * seconds
            return
        if self._decode_step_s is None:
            return
        target = self.max_slowdown * self._decode_step_s
        if seconds > target:
            self._chunk = max(1.0, self._chunk * max(0.5, target / seconds))
        elif seconds < 0.8 * target:
            self._chunk = min(float(self.max_chunk), self._chunk * 1.25 + 1)
