"""A fake `ModelRunner`: a deterministic "model" that keeps honest books on its cache rows.

Each prompt word is one position (its key is the word). The fake remembers, per cache row, the
key written at every position; a step that reads a position nobody wrote, or writes out of
order, fails the test. The token it samples is a hash of everything the row holds up to the new
position (plus the seed when sampling), so a sequence whose row held someone else's KV, or
whose prefix reuse was wrong, produces different tokens than it does alone.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vilaserve.domain.shared.conversation import TEMPLATES, ConversationTemplate
from vilaserve.domain.shared.errors import ContextOverflow, ServingError
from vilaserve.domain.shared.generation import SamplingParams
from vilaserve.domain.worker.batch import ModelBatch, PositionKey, StepTiming
from vilaserve.domain.worker.ports import (
    CompiledConstraint,
    Detokenizer,
    ImageFeatures,
    ModelRunner,
    PreparedPrompt,
)

STOP = 0  # the fake's end-of-text token
VOCAB = 50


@dataclass
class FakePrompt(PreparedPrompt):
    words: list[PositionKey]
    limit: int
    seed: int | None = None
    stops: frozenset[int] = frozenset({STOP})

    @property
    def keys(self) -> Sequence[PositionKey]:
        return self.words

    @property
    def max_new_tokens(self) -> int:
        return self.limit

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self.stops


class FakeDetokenizer(Detokenizer):
    def push(self, token: int) -> str:
        return f" t{token}"

    def flush(self) -> str:
        return ""


@dataclass
class FakeModelRunner(ModelRunner[FakePrompt]):
    cache_rows: int = 4
    length: int = 512
    delay_s: float = 0.0
    stop_at: int | None = None  # sample STOP once a sequence has this many positions
    fail_next: ServingError | None = None
    step_timing: StepTiming | None = None  # what it says every step with chunks took
    batches: list[ModelBatch[FakePrompt]] = field(default_factory=list)
    kv: dict[int, list[PositionKey]] = field(default_factory=dict)  # cache row -> its keys

    @property
    def context_length(self) -> int:
        return self.length

    @property
    def conversation_template(self) -> ConversationTemplate:
        return TEMPLATES["vicuna_v1"]

    @property
    def num_cache_rows(self) -> int:
        return self.cache_rows

    @property
    def cache_row_length(self) -> int:
        return self.length

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    @property
    def last_step_timing(self) -> StepTiming | None:
        return self.step_timing

    def detokenizer(self) -> Detokenizer:
        return FakeDetokenizer()

    def prepare(
        self,
        prompt: str,
        images: ImageFeatures | None,
        params: SamplingParams,
        constraint: CompiledConstraint | None = None,
    ) -> FakePrompt:
        # "t7" is how token 7 reads back (FakeDetokenizer): the same key, as a real tokenizer
        # would give the same id for a generated word sent back in the next turn.
        words: list[PositionKey] = [
            int(w[1:]) if w[:1] == "t" and w[1:].isdigit() else w for w in prompt.split()
        ]
        if len(words) >= self.length:
            raise ContextOverflow(f"{len(words)} positions; the context holds {self.length}")
        seed = None if params.is_greedy else (params.seed or 0)
        limit = min(params.max_new_tokens, self.length - len(words))
        return FakePrompt(words, limit, seed, frozenset({STOP, *params.stop_token_ids}))

    def submit(self, work: Callable[[], None]) -> None:
        # The fake's "model thread" is the event loop itself: an engine step takes `delay_s`;
        # other work (a request in, an abort) runs as soon as the loop gets to it.
        loop = asyncio.get_running_loop()
        if getattr(work, "__name__", "") == "_step":
            loop.call_later(self.delay_s, work)
        else:
            loop.call_soon(work)

    def execute(self, batch: ModelBatch[FakePrompt]) -> Sequence[int]:
        self.batches.append(batch)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        sampled = []
        for row in batch.decodes:
            self._write(row.cache_row, row.position, row.token)
            sampled.append(self._sample(row.cache_row, row.position + 1, row.prompt.seed))
        for chunk in batch.prefills:
            for position in range(chunk.start, chunk.end):
                self._write(chunk.cache_row, position, chunk.prompt.words[position])
            if chunk.samples:
                sampled.append(self._sample(chunk.cache_row, chunk.end, chunk.prompt.seed))
        return sampled

    def _write(self, cache_row: int, position: int, key: PositionKey) -> None:
        held = self.kv.setdefault(cache_row, [])
        assert position <= len(held), f"row {cache_row}: position {position} written before earlier"
        del held[position:]
        held.append(key)

    def _sample(self, cache_row: int, length: int, seed: int | None) -> int:
        held = self.kv[cache_row]
        assert len(held) == length, f"row {cache_row}: {len(held)} positions, expected {length}"
        if self.stop_at is not None and length >= self.stop_at:
            return STOP
        digest = hashlib.blake2b(repr((held, seed)).encode(), digest_size=4).digest()
        return 1 + int.from_bytes(digest, "little") % (VOCAB - 1)
