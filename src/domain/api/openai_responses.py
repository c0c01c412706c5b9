"""OpenAI response bodies and stream chunks, built from per-choice generation events."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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

    def body(
        self, texts: Sequence[str], finished: Sequence[ChoiceFinished], usage: Usage
    ) -> dict[str, Any]:
        ordered = sorted(finished, key=lambda e: e.index)
        choices = [self._final_choice(e.index, texts[e.index], e.finish_reason) for e in ordered]
        return {**self._envelope(self.body_object, choices), "usage": usage.to_dict()}

    def _final_choice(self, index: int, text: str, finish_reason: str) -> dict[str, Any]:
        raise NotImplementedError


class ChatFormat(_Format):
    """`chat.completion` bodies and `chat.completion.chunk` stream chunks."""

    chunk_object = "chat.completion.chunk"
    body_object = "chat.completion"

    def opening_chunks(self, n: int) -> list[dict[str, Any]]:
        return [
            self._chunk([_chat_delta(i, {"role": "assistant", "content": ""}, None)])
            for i in range(n)
        ]

    def delta_chunk(self, index: int, text: str) -> dict[str, Any]:
        return self._chunk([_chat_delta(index, {"content": text}, None)])

    def finish_chunk(self, index: int, finish_reason: str) -> dict[str, Any]:
        return self._chunk([_chat_delta(index, {}, finish_reason)])

    def _final_choice(self, index: int, text: str, finish_reason: str) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }


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
