"""The `TextGenerator` port in front of the engine: each request's async iterator reads its
sequence's outbox, so the use cases stream exactly as they did with one sequence per model.
Its admission queue is the engine's (admission.py).

Prompts are tokenized on a thread of their own, one at a time: a long prompt never holds the
event loop (other requests, heartbeats and status go on meanwhile), never delays an engine step
on the model thread, and the tokenizer is never used by two threads at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from vilaserve.application.worker.engine.engine import Engine
from vilaserve.domain.shared.conversation import ConversationTemplate
from vilaserve.domain.shared.errors import ServingError
from vilaserve.domain.shared.generation import GenerationStep, PromptTimings, SamplingParams
from vilaserve.domain.worker.ports import (
    Admitted,
    CompiledConstraint,
    ImageFeatures,
    TextGenerator,
)

# The last token of these endings is not text: an end token, or whatever was sampled for a
# prompt whose output constraint allowed nothing.
_TOKEN_NOT_SHOWN = ("stop", "grammar_error")


class EngineTextGenerator(TextGenerator):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._runner = engine.runner
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vilaserve-tok")

    @property
    def context_length(self) -> int:
        return self._runner.context_length

    @property
    def compute_path(self) -> str | None:
        return self._runner.compute_path

    @property
    def conversation_template(self) -> ConversationTemplate:
        return self._runner.conversation_template

    async def count_tokens(self, text: str) -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizing, self._runner.count_tokens, text)

    def admit(self) -> Admitted:
        return self.engine.admission.admit()

    @property
    def queue_length(self) -> int:
        return self.engine.admission.queue_length

    def generate(
        self,
        prompt: str,
        images: ImageFeatures | None,
        params: SamplingParams,
        admitted: Admitted | None = None,
        constraint: CompiledConstraint | None = None,
    ) -> AsyncIterator[GenerationStep]:
        return self._stream(prompt, images, params, admitted, constraint)

    async def _stream(
        self,
        prompt: str,
        images: ImageFeatures | None,
        params: SamplingParams,
        admitted: Admitted | None,
        constraint: CompiledConstraint | None,
    ) -> AsyncIterator[GenerationStep]:
        admission = self.engine.admission
        ticket = admission.admit() if admitted is None else admission.claim(admitted)
        loop = asyncio.get_running_loop()
        try:
            # Raises before any step (a prompt that cannot fit, placeholders without images).
            prepare = partial(self._runner.prepare, prompt, images, params, constraint=constraint)
            prepared = await loop.run_in_executor(self._tokenizing, prepare)
            seq = self.engine.submit(prepared, ticket)
        except BaseException:  # refused, or abandoned while tokenizing: never in the engine
            ticket.leave()
            raise
        detokenizer = self._runner.detokenizer()
        produced = 0
        try:
            while True:
                out = await seq.outbox.get()
                if isinstance(out, ServingError):
                    raise out
                produced += 1
                if out.finish_reason in _TOKEN_NOT_SHOWN:
                    text = detokenizer.flush()
                else:
                    text = detokenizer.push(out.token)
                    if out.finish_reason is not None:
                        text += detokenizer.flush()
                # The engine wrote the sequence's timings before it sent the first token.
                timings = (
                    PromptTimings(seq.queued_s, seq.prefill_s, seq.first_sample_s)
                    if produced == 1
                    else None
                )
                yield GenerationStep(text, seq.prompt_length, produced, out.finish_reason, timings)
                if out.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                self.engine.abort(seq)

    async def stop_all(self, error: ServingError) -> None:
        self.engine.fail_all(error)

    async def close(self) -> None:
        await self.engine.close()
        self._tokenizing.shutdown(wait=False, cancel_futures=True)
