"""Asking a model in this process about images: `vilaserve chat` and the demo benchmark.

The prompt is built exactly as the OpenAI API builds it (`build_chat_prompt` with the model's
own template) and runs through the worker's `GenerateStream`, so an answer here is the answer
the served model gives to the same chat message.

A follow-up question passes the earlier turns as `history`: the messages are then the ones the
web chat (`entrypoints/api/static/chat.js`) sends for its turn 2, 3, ...: the whole
conversation, the pictures in the first user message only (as image parts before its text),
each earlier reply as an assistant message, later questions as plain-text user messages, and
the pictures' bytes sent again with every turn.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Sequence

from vilaserve.application.worker.generate_stream import GenerateStream, GenerationLimits
from vilaserve.domain.api.chat_prompt import build_chat_prompt
from vilaserve.domain.api.openai_requests import ChatMessage, ContentPart, ImagePart, TextPart
from vilaserve.domain.shared.conversation import ChatTemplateRenderer
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


def chat_messages(
    question: str, image_count: int, history: Sequence[tuple[str, str]] = ()
) -> list[ChatMessage]:
    """The OpenAI messages of a chat whose earlier turns are `history` ((question, reply)
    pairs, oldest first) and whose next question is `question`, as the web chat sends them:
    the `image_count` images go with the first question."""
    questions = [asked for asked, _ in history] + [question]
    replies = [reply for _, reply in history]
    messages: list[ChatMessage] = []
    for turn, asked in enumerate(questions):
        if turn == 0 and image_count:
            parts: list[ContentPart] = [
                ImagePart(type="image_url", image_url={"url": "data:image/png;base64,"})
                for _ in range(image_count)
            ]
            if asked:
                parts.append(TextPart(type="text", text=asked))
            messages.append(ChatMessage(role="user", content=parts))
        else:
            messages.append(ChatMessage(role="user", content=asked))
        if turn < len(replies):
            messages.append(ChatMessage(role="assistant", content=replies[turn]))
    return messages


class AskAboutImages:
    def __init__(
        self,
        generator: TextGenerator,
        vision: VisionEncoder | None,
        limits: GenerationLimits | None = None,
        renderer: ChatTemplateRenderer | None = None,
    ) -> None:
        """`renderer`: needed for a model whose template is its tokenizer's Jinja one."""
        self._generator = generator
        self._vision = vision
        self._renderer = renderer
        self._stream = GenerateStream(generator, vision, limits or GenerationLimits())

    def prompt(
        self, question: str, image_count: int, history: Sequence[tuple[str, str]] = ()
    ) -> str:
        """The prompt text for `question` after the (question, reply) turns of `history`."""
        messages = chat_messages(question, image_count, history)
        template = self._generator.conversation_template
        multimodal = self._vision is not None
        return build_chat_prompt(template, messages, multimodal, self._renderer).text

    async def ask(
        self,
        question: str,
        images: Sequence[bytes] = (),
        *,
        history: Sequence[tuple[str, str]] = (),
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> AsyncIterator[str]:
        """Yields the answer piece by piece; raises `AskFailed` with the model's message.

        `history`: the chat's earlier (question, reply) turns, oldest first; `images` belong
        to its first question (to `question` when there is no history)."""
        body = {
            "prompt": self.prompt(question, len(images), history),
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
        history: Sequence[tuple[str, str]] = (),
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> str:
        pieces = self.ask(
            question,
            images,
            history=history,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        )
        return "".join([piece async for piece in pieces])
