"""What one engine step asks of the model: prompt chunks to prefill and rows to decode.

The scheduler (application/worker/engine) builds a `ModelBatch` in plain Python; the model
runner (an adapter) executes it and returns one sampled token per decode row and per chunk
that samples. Each running sequence owns one row of the KV cache, its `cache_row`, until it
leaves.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

PromptT = TypeVar("PromptT")

# One key per prompt position: text positions are keyed by their token id, image positions by
# the image's content and the row within it. Two prompts whose leading keys agree have the same
# KV there, which is what lets a new request reuse a cached prefix.
PositionKey = Hashable


@dataclass(frozen=True)
class PrefillChunk(Generic[PromptT]):
    """Positions [start, end) of `prompt` go into `cache_row`; when `samples`, the chunk
    ends the prompt and the sequence's first new token is sampled from its last position."""

    prompt: PromptT
    cache_row: int
    start: int
    end: int
    samples: bool


@dataclass(frozen=True)
class DecodeRow(Generic[PromptT]):
    """Feed `token` at `position` of `cache_row` and sample the next one."""

    prompt: PromptT
    cache_row: int
    position: int
    token: int


@dataclass(frozen=True)
class ModelBatch(Generic[PromptT]):
    """One step's work. The runner returns the sampled tokens in this order: every decode row,
    then every prefill chunk that samples.

    `constrained`: some running prompt has an output constraint, so this step's sampled rows
    may need token masks; when false the runner does no constraint work at all."""

    decodes: tuple[DecodeRow[PromptT], ...] = ()
    prefills: tuple[PrefillChunk[PromptT], ...] = ()
    constrained: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.end - c.start for c in self.prefills)

    @property
    def num_samples(self) -> int:
        return len(self.decodes) + sum(1 for c in self.prefills if c.samples)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


@dataclass(frozen=True)
class StepTiming:
    """How a runner's step that prefilled spent its time, in seconds: everything before the
    sampling (the batch's decode rows and prompt chunks, their inputs), then the sampling."""

    forward_s: float
    sample_s: float
