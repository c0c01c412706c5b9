"""One request inside the engine: its prompt, its cache row and what it has produced."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Literal

from vilaserve.application.worker.engine.admission import Ticket
from vilaserve.domain.shared.errors import ServingError
from vilaserve.domain.shared.generation import FinishReason
from vilaserve.domain.worker.batch import PositionKey
from vilaserve.domain.worker.ports import PreparedPrompt


@dataclass(frozen=True)
class TokenOut:
    """One produced token, as the request's stream receives it."""

    token: int
    finish_reason: FinishReason | None


# What a request's outbox carries: tokens, then at most one error.
Outcome = TokenOut | ServingError


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # submitted: in the inbox or the scheduler's queue
    RUNNING = "running"  # admitted: holds a cache row
    FINISHED = "finished"  # out of the engine for good; `EngineSequence.end` says why


# Why a sequence left: its last token said so (or its output constraint dead-ended), its client
# went away, or its step failed.
EndReason = Literal["stop", "length", "grammar_error", "aborted", "failed"]


@dataclass(eq=False)
class EngineSequence:
    seq_id: int
    prompt: PreparedPrompt
    arrived: float
    ticket: Ticket  # the request's place in the admission queue, moved as the sequence moves
    outbox: asyncio.Queue[Outcome] = field(default_factory=asyncio.Queue)
    cache_row: int = -1  # -1: holds none
    computed: int = 0  # leading positions whose keys/values are in its cache row
    reused: int = 0  # of those, how many came from the prefix cache
    output: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    end: EndReason | None = None
    last_token_at: float = 0.0
    loop: asyncio.AbstractEventLoop | None = None  # where the request's stream awaits
    # Up to its first token, on the model thread: seconds from arrival to its first chunk's
    # step, of the steps that ran its chunks, and of the sampling of that token.
    queued_s: float = 0.0
    prefill_s: float = 0.0
    first_sample_s: float = 0.0

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def start(self, cache_row: int, cached: int) -> None:
        """The one way into the batch (on the model thread): it holds `cache_row`, whose first
        `cached` positions it reuses."""
        self.cache_row, self.computed, self.reused = cache_row, cached, cached
        self.status = SequenceStatus.RUNNING
        self.ticket.started()

    def finish(self, reason: EndReason) -> None:
        """The one way out of the engine (on the model thread), once its cache row is given back:
        the request leaves the admission count here, whatever the reason."""
        self.status = SequenceStatus.FINISHED
        self.end = reason
        self.ticket.ended()

    @property
    def prompt_length(self) -> int:
        return len(self.prompt.keys)

    @property
    def is_prefilled(self) -> bool:
        return self.computed >= self.prompt_length

    def written_keys(self) -> list[PositionKey]:
        """Keys of the positions whose KV is in its cache row: the prompt, then the fed tokens."""
        keys = list(self.prompt.keys[: self.computed])
        fed = self.computed - self.prompt_length
        if fed > 0:
            keys.extend(self.output[:fed])
        return keys
