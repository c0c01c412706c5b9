"""The scheduling policy: which sequences run in the next step, and how much of each prompt.

Every step decodes all running sequences that finished their prompt, one token each. Prompts
are prefilled in chunks inside the same steps: up to `max_num_batched_tokens` positions when
nothing is decoding, but while streams are running only as many as keep the step within
`max_itl_slowdown` times a decode-only step (chunk_control.py, at most
`prefill_chunk_while_decoding`), so a long prompt that arrives mid-stream delays each running
token by a bounded factor rather than by the whole prompt (a short prompt, `short_prompt`
positions or fewer, is taken whole: its first token matters more than one slower step for the
others). Sequences join the batch first come, first served, while a cache row is free and fewer
than `max_num_seqs` run.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vilaserve.application.worker.engine.cache_rows import CacheRows
from vilaserve.application.worker.engine.chunk_control import ChunkController
from vilaserve.application.worker.engine.sequence import EngineSequence, TokenOut
from vilaserve.domain.shared.errors import InvalidRequest
from vilaserve.domain.shared.generation import FinishReason
from vilaserve.domain.worker.batch import DecodeRow, ModelBatch, PrefillChunk
from vilaserve.domain.worker.ports import PreparedPrompt


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 8  # sequences in the batch: the requests that run at once
    # Requests the engine holds at once, running and waiting (pictures being encoded included);
    # beyond, the admission queue (admission.py) refuses at once. None: no bound.
    max_requests: int | None = None
    # Of those, requests served at once (pictures encoded, then generated): the others wait
    # for their turn before any work, so a burst neither holds every request's picture
    # features nor stalls the running streams with encodes. None: no bound.
    max_in_service: int | None = None
    max_num_batched_tokens: int = 2048
    prefill_chunk_while_decoding: int = 512
    max_itl_slowdown: float = 2.5
    # Prompts with at most this many positions left are prefilled whole (their first token
    # soon); only longer ones are chunked to protect the running streams.
    short_prompt: int = 256

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"need max_num_seqs >= 1 and max_num_batched_tokens >= max_num_seqs "
                f"(got {self.max_num_seqs} and {self.max_num_batched_tokens})"
            )
        if self.prefill_chunk_while_decoding < 1:
            raise ValueError("prefill_chunk_while_decoding must be >= 1")
        if self.max_itl_slowdown <= 1.0:
            raise ValueError("max_itl_slowdown must be > 1")


@dataclass(frozen=True)
class ScheduledStep:
    batch: ModelBatch[PreparedPrompt]
    decoding: tuple[EngineSequence, ...]  # in the batch's decode order
    prefilling: tuple[EngineSequence, ...]  # in the batch's prefill order
    # Sequences that could not be admitted (an empty prompt, keys the prefix match broke on):
    # out already.
    refused: tuple[tuple[EngineSequence, Exception], ...] = ()


@dataclass
class StepOutcome:
    """What a step produced, per sequence, and who left (and why)."""

    tokens: list[tuple[EngineSequence, TokenOut]] = field(default_factory=list)
    finished: list[tuple[EngineSequence, FinishReason]] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache_rows: CacheRows) -> None:
        self.config = config
        self.cache_rows = cache_rows
        self.chunks = ChunkController(config.prefill_chunk_while_decoding, config.max_itl_slowdown)
        self.waiting: deque[EngineSequence] = deque()
        self.running: list[EngineSequence] = []
        # How many running prompts have an output constraint: counted as they come and go, so
        # that a step without any knows it at once (`ModelBatch.constrained`).
        self._constrained = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: EngineSequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: EngineSequence) -> None:
        """Takes a sequence out wherever it is (a client went away); its cache row is freed now,
        keeping the prefix it computed for later requests."""
        if seq in self.running:
            self._stop_running(seq)
            self._free_row(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def fail(self, seqs: tuple[EngineSequence, ...]) -> None:
        """Drops sequences whose step failed; their cache rows' contents are not trusted."""
        for seq in seqs:
            if seq in self.running:
                self._stop_running(seq)
                self.cache_rows.release(seq.cache_row, [])
                seq.cache_row = -1

    def schedule(self) -> ScheduledStep:
        config = self.config
        decoding = tuple(seq for seq in self.running if seq.is_prefilled)
        refused = self._admit()
        budget = config.max_num_batched_tokens - len(decoding)
        long_budget = min(budget, self.chunks.chunk) if decoding else budget
        prefilling: list[EngineSequence] = []
        chunks: list[PrefillChunk[PreparedPrompt]] = []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.is_prefilled:
                continue
            remaining = seq.prompt_length - seq.computed
            if remaining <= config.short_prompt:
                take = min(remaining, budget)
            elif long_budget > 0:
                take = min(remaining, budget, long_budget)
                long_budget -= take
            else:
                continue
            end = seq.computed + take
            chunks.append(
                PrefillChunk(seq.prompt, seq.cache_row, seq.computed, end, end == seq.prompt_length)
            )
            prefilling.append(seq)
            budget -= take
        rows = tuple(
            DecodeRow(seq.prompt, seq.cache_row, seq.computed, seq.output[-1]) for seq in decoding
        )
        batch = ModelBatch(rows, tuple(chunks), constrained=self._constrained > 0)
        return ScheduledStep(batch, decoding, tuple(prefilling), tuple(refused))

    def _admit(self) -> list[tuple[EngineSequence, Exception]]:
        """Admits waiting sequences in order; one whose prompt cannot be admitted (a prompt
        without positions, keys `CacheRows` cannot compare) leaves the queue with its error
        rather than blocking it, or failing every later step."""
        refused: list[tuple[EngineSequence, Exception]] = []
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            try:
                if seq.prompt_length == 0:
                    # A tokenizer without BOS (Qwen2, SmolLM2) makes "" no position at all.
                    raise InvalidRequest("the prompt is empty: there is nothing to continue from")
                found = self.cache_rows.acquire(seq.prompt.keys)
            except Exception as exc:  # reported to that request, not to the whole step
                self.waiting.popleft()
                refused.append((seq, exc))
                continue
            if found is None:
                break
            self.waiting.popleft()
            seq.start(*found)
            self.running.append(seq)
            self._constrained += seq.prompt.constrained
        return refused

    def update(self, step: ScheduledStep, sampled: list[int]) -> StepOutcome:
        """Applies a step's results: positions computed, tokens appended, finished sequences
        out (their cache rows freed at once)."""
        outcome = StepOutcome()
        samples = iter(sampled)
        for seq in step.decoding:
            seq.computed += 1
            self._append(seq, next(samples), outcome)
        for seq, chunk in zip(step.prefilling, step.batch.prefills, strict=True):
            seq.computed = chunk.end
            if chunk.samples:
                self._append(seq, next(samples), outcome)
        for seq, reason in outcome.finished:
            self._stop_running(seq)
            self._free_row(seq)
            seq.finish(reason)  # after its cache row is free: the load figures see both at once
        return outcome

    def _append(self, seq: EngineSequence, token: int, outcome: StepOutcome) -> None:
        seq.output.append(token)
        finish: FinishReason | None = None
        if seq.prompt.constraint_failed:  # its token is no answer: the constraint allowed none
            finish = "grammar_error"
        elif token in seq.prompt.stop_token_ids:
            finish = "stop"
        elif len(seq.output) >= seq.prompt.max_new_tokens:
            finish = "length"
        outcome.tokens.append((seq, TokenOut(token, finish)))
        if finish is not None:
            outcome.finished.append((seq, finish))

    def _stop_running(self, seq: EngineSequence) -> None:
        self.running.remove(seq)
        self._constrained -= seq.prompt.constrained

    def _free_row(self, seq: EngineSequence) -> None:
        self.cache_rows.release(seq.cache_row, seq.written_keys())
        seq.cache_row = -1
