"""One generation the API asks a worker for, and how OpenAI's sampling fields map onto it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from vilaserve.domain.api.errors import ContextTooLong
from vilaserve.domain.api.openai_requests import SEED_RANGE, SamplingRequest
from vilaserve.domain.api.structured_outputs import StructuredOutput
from vilaserve.domain.shared.conversation import ConversationTemplate

DEFAULT_TEMPERATURE = 1.0  # OpenAI's and vLLM's default
DEFAULT_TOP_P = 1.0


@dataclass(frozen=True)
class WorkerJob:
    """The body of one `/worker_generate_stream` call (FastChat's gen params, echo off)."""

    model: str
    prompt: str
    images: tuple[str, ...] = ()  # data URLs, as the worker accepts them
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    constraint: StructuredOutput | None = None  # what the answer must match

    def for_choice(self, index: int) -> WorkerJob:
        """Choice `index` of `n`: a different seed each (seed + index) when a seed was given."""
        if self.seed is None or index == 0:
            return self
        seed = self.seed + index
        if seed >= SEED_RANGE:  # wrap within the signed 64-bit range the worker accepts
            seed -= 2 * SEED_RANGE
        return replace(self, seed=seed)

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "prompt": self.prompt,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "stop": list(self.stop),
            "stop_token_ids": list(self.stop_token_ids),
            "echo": False,
        }
        if self.seed is not None:
            payload["seed"] = self.seed
        if self.ignore_eos:
            payload["ignore_eos"] = True
        if self.images:
            payload["images"] = list(self.images)
        if self.constraint is not None:
            payload["structured_outputs"] = self.constraint.to_payload()
        return payload


def job_for(
    request: SamplingRequest,
    prompt: str,
    template: ConversationTemplate,
    context_length: int,
    images: tuple[str, ...] = (),
    constraint: StructuredOutput | None = None,
) -> WorkerJob:
    """Maps the sampling fields; raises `ContextTooLong` when max_tokens exceeds the context.

    Without max_tokens the reply may use the whole context: the worker stops at what is left
    after the prompt (and at its own cap), and reports `finish_reason: length` when it does.
    """
    max_tokens = request.requested_max_tokens
    if max_tokens is not None and max_tokens > context_length:
        raise ContextTooLong(
            f"max_tokens is {max_tokens}, but the model's context holds {context_length} "
            "tokens including the prompt",
            param="max_tokens",
        )
    top_p = DEFAULT_TOP_P if request.top_p is None else request.top_p
    top_k = request.top_k if request.top_k and request.top_k > 0 else -1
    if top_p == 0:  # an empty nucleus keeps only the most likely token, as OpenAI treats it
        top_p, top_k = 1.0, 1
    # vLLM's `ignore_eos`: the template's own end-of-turn strings and tokens do not end it.
    own_stops = () if request.ignore_eos else template.stop_str
    own_stop_ids = () if request.ignore_eos else template.stop_token_ids
    return WorkerJob(
        model=request.model,
        prompt=prompt,
        images=images,
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_tokens or context_length,
        stop=tuple(dict.fromkeys((*request.stop_list, *own_stops))),
        stop_token_ids=tuple(dict.fromkeys((*own_stop_ids, *(request.stop_token_ids or ())))),
        seed=request.seed,
        ignore_eos=request.ignore_eos,
        constraint=constraint,
    )
