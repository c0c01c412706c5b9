"""The `TextGenerator` port in front of the engine: each request's async iterator reads its
sequence's outbox, so the use cases stream exactly as they did with one sequence per model."""

from __future__ import annotations

from collections.abc import AsyncIterator

from vilaserve.application.worker.engine.engine import Engine
from vilaserve.application.worker.engine.sequence import Sequence
from vilaserve.domain.shared.conversation import ConversationTemplate
from vilaserve.domain.shared.errors import ServingError
from vilaserve.domain.shared.generation import GenerationStep, SamplingParams
from vilaserve.domain.worker.ports import ImageFeatures, TextGenerator


class EngineTextGenerator(TextGenerator):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._runner = engine.runner

    @property
    def context_length(self) -> int:
        return self._runner.context_length

    @property
    def compute_path(self) -> str | None:
        return self._runner.compute_path

    @property
    def conversation_template(self) -> ConversationTemplate:
        return self._runner.conversation_template

    def count_tokens(self, text: str) -> int:
        return self._runner.count_tokens(text)

    def generate(
        self, prompt: str, images: ImageFeatures | None, params: SamplingParams
    ) -> AsyncIterator[GenerationStep]:
        prepared = self._runner.prepare(prompt, images, params)  # raises before any step
        return self._stream(self.engine.submit(prepared))

    async def _stream(self, seq: Sequence) -> AsyncIterator[GenerationStep]:
        detokenizer = self._runner.detokenizer()
        produced = 0
        try:
            while True:
                out = await seq.outbox.get()
                if isinstance(out, ServingError):
                    raise out
                produced += 1
                if out.finish_reason == "stop":
                    text = detokenizer.flush()
                else:
                    text = detokenizer.push(out.token)
                    if out.finish_reason is not None:
                        text += detokenizer.flush()
                yield GenerationStep(text, seq.prompt_length, produced, out.finish_reason)
                if out.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                self.engine.abort(seq)

    async def stop_all(self, error: ServingError) -> None:
        self.engine.fail_all(error)

    async def close(self) -> None:
        await self.engine.close()
