"""Asking a model in this process about images: `vilaserve chat` and the demo benchmark.

The prompt is built exactly as the OpenAI API builds it (`build_chat_prompt` with the model's
own template) and runs through the worker's `GenerateStream`, so an answer here is the answer
the served model gives to the same chat message.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Sequence

from vilaserve.application.worker.generate_stream import GenerateStream, GenerationLimits
from vilaserve.application.worker.slots import ConcurrencySlots
from vilaserve.domain.api.chat_prompt import build_chat_prompt
from vilaserve.domain.api.openai_requests import ChatMessage, ContentPart, ImagePart, TextPart
from vilaserve.domain.shared.errors import ErrorCode, ServingError
from vilaserve.domain.worker.ports import TextGenerator, VisionEncoder


class AskFailed(Exception):
    """The model refused or failed the question; the message says why."""


def user_message(question: str, image_count: int) -> ChatMessage:
    """One user turn with `image_count` images (their bytes travel separately)."""
    parts: list[ContentPart] = [TextPart(type="text", text=question)]
    parts += [
        ImagePart(type="image_url", image_url={"url": "data:image/png;base64,"})
        for _ in range(image_count)
    ]
    return ChatMessage(role="user", content=parts)


class AskAboutImages:
    def __init__(
        self,
        generator: TextGenerator,
        vision: VisionEncoder | None,
        limits: GenerationLimits | None = None,
    ) -> None:
        self._generator = generator
        self._vision = vision
        self._stream = GenerateStream(
            generator, vision, ConcurrencySlots(1), limits or GenerationLimits()
        )

    def prompt(self, question: str, image_count: int) -> str:
        message = user_message(question, image_count)
        template = self._generator.conversation_template
        return build_chat_prompt(template, [message], multimodal=self._vision is not None).text

    async def ask(
        self,
        question: str,
        images: Sequence[bytes] = (),
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> AsyncIterator[str]:
        """Yields the answer piece by piece; raises `AskFailed` with the model's message."""
        body = {
            "prompt": self.prompt(question, len(images)),
            "images": [base64.b64encode(data).decode("ascii") for data in images],
            "temperature": temperature,
            "max_new_tokens": max_new_tokens,
            "echo": False,
        }
        try:
            prepared = self._stream.prepare(body)
        except ServingError as error:
            raise AskFailed(error.message) from error
        sent = 0
        async for chunk in self._stream.stream(prepared):
            if chunk.error_code != int(ErrorCode.OK):
                raise AskFailed(chunk.text)
            if len(chunk.text) > sent:
                yield chunk.text[sent:]
                sent = len(chunk.text)

    async def answer(
        self,
        question: str,
        images: Sequence[bytes] = (),
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> str:
        pieces = self.ask(question, images, max_new_tokens=max_new_tokens, temperature=temperature)
        return "".join([piece async for piece in pieces])
