"""OpenAI response bodies and stream chunks, built from per-choice generation events.

A chat answer that may call tools is read by a `ToolCallParser` per choice: its calls become
`tool_calls` (in the message, or as OpenAI's `tool_calls` deltas: one that opens each call with
its index, id and name and empty arguments, then pieces of its arguments), and a choice that
called a function and stopped by itself ends with `finish_reason: "tool_calls"`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vilaserve.domain.api.tool_call_parser import (
    ArgumentsPiece,
    CallOpened,
    ContentPiece,
    ReadAnswer,
    ToolCallParser,
    ToolEvent,
    new_call_id,
    read_answer,
)
from vilaserve.domain.api.tool_syntax import ToolCallSyntax
from vilaserve.domain.shared.generation import Usage

REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class TextDelta:
    index: int
    text: str


@dataclass(frozen=True)
class ChoiceFinished:
    index: int
    finish_reason: str
    usage: Usage


ChoiceEvent = TextDelta | ChoiceFinished


class CumulativeText:
    """Turns the worker's cumulative text into deltas.

    A trailing U+FFFD is the first byte of a character still being decoded; it is held back
    until the character is whole, so no client ever sees a broken character.
    """

    def __init__(self) -> None:
        self.sent = ""

    def advance(self, cumulative: str, final: bool = False) -> str:
        stable = cumulative if final else cumulative.rstrip(REPLACEMENT_CHAR)
        if len(stable) <= len(self.sent):
            return ""
        delta = stable[len(self.sent) :]
        self.sent = stable
        return delta


def combine_usage(finished: Iterable[ChoiceFinished], choices_per_prompt: int) -> Usage:
    """Usage of a whole request, counted as OpenAI does: each distinct prompt once, every
    choice's completion tokens summed."""
    prompt_tokens: dict[int, int] = {}
    completion_tokens = 0
    for event in finished:
        prompt_tokens[event.index // choices_per_prompt] = event.usage.prompt_tokens
        completion_tokens += event.usage.completion_tokens
    return Usage(sum(prompt_tokens.values()), completion_tokens)


@dataclass(frozen=True)
class ResponseIdentity:
    id: str
    model: str
    created: int


class _Format:
    """What the two endpoints share: the envelope of bodies and chunks, and the usage chunk."""

    chunk_object = ""
    body_object = ""

    def __init__(self, identity: ResponseIdentity, include_usage: bool = False) -> None:
        self._identity = identity
        self._include_usage = include_usage

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self._identity.id,
            "object": kind,
            "created": self._identity.created,
            "model": self._identity.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = self._envelope(self.chunk_object, choices)
        if self._include_usage:
            chunk["usage"] = None  # OpenAI: null on every chunk but the last
        return chunk

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return {**self._chunk([]), "usage": usage.to_dict()}

    def text_chunks(self, index: int, text: str) -> list[dict[str, Any]]:
        """The chunks for new text of choice `index`."""
        return [self.delta_chunk(index, text)]

    def closing_chunks(self, index: int, finish_reason: str) -> list[dict[str, Any]]:
        """The chunks that end choice `index`: what was held back, then its finish reason."""
        return [self.finish_chunk(index, finish_reason)]

    def delta_chunk(self, index: int, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def finish_chunk(self, index: int, finish_reason: str) -> dict[str, Any]:
        raise NotImplementedError

    def body(
        self, texts: Sequence[str], finished: Sequence[ChoiceFinished], usage: Usage
    ) -> dict[str, Any]:
        ordered = sorted(finished, key=lambda e: e.index)
        choices = [self._final_choice(e.index, texts[e.index], e.finish_reason) for e in ordered]
        return {**self._envelope(self.body_object, choices), "usage": usage.to_dict()}

    def _final_choice(self, index: int, text: str, finish_reason: str) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class ToolCallReading:
    """How to read tool calls out of answers: the template's syntax, and the functions that
    may be called (a call to another is text)."""

    syntax: ToolCallSyntax
    functions: Collection[str]
    call_id: Callable[[], str] = new_call_id

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self.syntax, self.functions, self.call_id)

    def read(self, text: str) -> ReadAnswer:
        return read_answer(text, self.syntax, self.functions, self.call_id)


def tool_finish_reason(finish_reason: str, calls: int) -> str:
    # A call cut by max_tokens stays "length"; "grammar_error" stays what it is.
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


class ChatFormat(_Format):
    """`chat.completion` bodies and `chat.completion.chunk` stream chunks."""

    chunk_object = "chat.completion.chunk"
    body_object = "chat.completion"

    def __init__(
        self,
        identity: ResponseIdentity,
        include_usage: bool = False,
        tool_calls: ToolCallReading | None = None,
    ) -> None:
        super().__init__(identity, include_usage)
        self._tool_calls = tool_calls
        self._parsers: dict[int, ToolCallParser] = {}

    def opening_chunks(self, n: int) -> list[dict[str, Any]]:
        return [
            self._chunk([_chat_delta(i, {"role": "assistant", "content": ""}, None)])
            for i in range(n)
        ]

    def delta_chunk(self, index: int, text: str) -> dict[str, Any]:
        return self._chunk([_chat_delta(index, {"content": text}, None)])

    def finish_chunk(self, index: int, finish_reason: str) -> dict[str, Any]:
        return self._chunk([_chat_delta(index, {}, finish_reason)])

    def text_chunks(self, index: int, text: str) -> list[dict[str, Any]]:
        if self._tool_calls is None:
            return [self.delta_chunk(index, text)]
        return self._event_chunks(index, self._parser(index).feed(text))

    def closing_chunks(self, index: int, finish_reason: str) -> list[dict[str, Any]]:
        if self._tool_calls is None:
            return [self.finish_chunk(index, finish_reason)]
        parser = self._parser(index)
        chunks = self._event_chunks(index, parser.finish())
        reason = tool_finish_reason(finish_reason, parser.calls_made)
        return [*chunks, self.finish_chunk(index, reason)]

    def _parser(self, index: int) -> ToolCallParser:
        assert self._tool_calls is not None
        if index not in self._parsers:
            self._parsers[index] = self._tool_calls.parser()
        return self._parsers[index]

    def _event_chunks(self, index: int, events: list[ToolEvent]) -> list[dict[str, Any]]:
        return [self._chunk([_chat_delta(index, _delta(event), None)]) for event in events]

    def _final_choice(self, index: int, text: str, finish_reason: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self._tool_calls is not None:
            answer = self._tool_calls.read(text)
            if answer.calls:
                message["content"] = answer.content if answer.content.strip() else None
                message["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                    for call in answer.calls
                ]
                finish_reason = tool_finish_reason(finish_reason, len(answer.calls))
        return {
            "index": index,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason,
        }


def _delta(event: ToolEvent) -> dict[str, Any]:
    if isinstance(event, ContentPiece):
        return {"content": event.text}
    if isinstance(event, CallOpened):
        opened = {"name": event.name, "arguments": ""}
        call = {"index": event.index, "id": event.id, "type": "function", "function": opened}
        return {"tool_calls": [call]}
    assert isinstance(event, ArgumentsPiece)
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


def _chat_delta(index: int, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


class CompletionFormat(_Format):
    """`text_completion` bodies and chunks; `echo_prompts[i]` opens choice i when echo is on."""

    chunk_object = "text_completion"
    body_object = "text_completion"

    def __init__(
        self,
        identity: ResponseIdentity,
        include_usage: bool = False,
        echo_prompts: Sequence[str] = (),
    ) -> None:
        super().__init__(identity, include_usage)
        self._echo = tuple(echo_prompts)

    def _echo_for(self, index: int) -> str:
        return self._echo[index] if index < len(self._echo) else ""

    def opening_chunks(self, n: int) -> list[dict[str, Any]]:
        return [self.delta_chunk(i, self._echo_for(i)) for i in range(n) if self._echo_for(i)]

    def delta_chunk(self, index: int, text: str) -> dict[str, Any]:
        return self._chunk([_text_choice(index, text, None)])

    def finish_chunk(self, index: int, finish_reason: str) -> dict[str, Any]:
        return self._chunk([_text_choice(index, "", finish_reason)])

    def _final_choice(self, index: int, text: str, finish_reason: str) -> dict[str, Any]:
        return _text_choice(index, self._echo_for(index) + text, finish_reason)


def _text_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


ResponseFormat = ChatFormat | CompletionFormat


def model_card(
    model: str, created: int, context_length: int | None, multimodal: bool | None
) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "vilaserve",
        "root": model,
        "parent": None,
    }
    if context_length is not None:
        card["max_model_len"] = context_length
    if multimodal is not None:
        card["multimodal"] = multimodal
    return card
