"""The OpenAI request bodies we accept (`/v1/chat/completions`, `/v1/completions`), validated.

The surface follows OpenAI's and vLLM's: unknown fields are accepted and ignored (clients send
many), features the worker cannot provide (logprobs) are refused with a 400 that names them
instead of being silently dropped. A constraint on the answer (`structured_outputs`) and the
tools of a chat (`tool_definitions`) are checked here too, so that every 400 comes before any
work.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vilaserve.domain.api.errors import ApiError, BadRequest, ParamOutOfRange
from vilaserve.domain.api.structured_outputs import (
    Requested,
    ResponseFormat,
    StructuredOutput,
    StructuredOutputsParams,
    from_guided_fields,
    from_response_format,
    from_structured_outputs,
    the_one_constraint,
)
from vilaserve.domain.api.tool_definitions import (
    ToolChoice,
    ToolDefinition,
    ToolPolicy,
    check_tool_choice_word,
    tool_policy,
)

MAX_CHOICES = 16
MAX_STOP_STRINGS = 16
SEED_RANGE = 2**63
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageUrl(_Lenient):
    url: str
    detail: str | None = None  # accepted; the model has one resolution, so it changes nothing


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageUrl

    @field_validator("image_url", mode="before")
    @classmethod
    def _accept_bare_string(cls, value: Any) -> Any:
        # Some clients send `"image_url": "data:..."` instead of `{"url": ...}`.
        return {"url": value} if isinstance(value, str) else value


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class CalledFunction(_Lenient):
    name: str = Field(min_length=1)
    arguments: str = "{}"  # a JSON object, as text

    @field_validator("arguments", mode="before")
    @classmethod
    def _accept_an_object(cls, value: Any) -> Any:
        # Some clients send the arguments as the object itself.
        return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else value

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            raise ValueError("the arguments must be a JSON object, as text") from None
        if not isinstance(parsed, dict):
            raise ValueError("the arguments must be a JSON object, as text")
        return value

    @property
    def parsed_arguments(self) -> dict[str, Any]:
        return json.loads(self.arguments)  # type: ignore[no-any-return]


class ToolCall(_Lenient):
    """A call an earlier assistant message made (`tool_calls`), as the client sends it back."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages only
    tool_call_id: str | None = None  # tool messages: the call this one answers

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry 'tool_calls'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the 'tool_call_id' of the call it answers")
        return self


class StreamOptions(_Lenient):
    include_usage: bool = True  # vLLM's default when `stream_options` is given at all


class SamplingRequest(_Lenient):
    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=-SEED_RANGE, lt=SEED_RANGE)
    ignore_eos: bool = False  # vLLM's extension: the model's end-of-turn does not end it
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted for compatibility (FastChat and many UIs send them); the worker has no penalties.
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None
    # vLLM's constraints on the answer (`structured_outputs`), and their older names.
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(None, min_length=1)
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = Field(None, min_length=1)

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, value: int | None) -> int | None:
        if value is not None and value < -1:
            raise ValueError("top_k must be -1 or 0 (disabled) or >= 1")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        values = [value] if isinstance(value, str) else (value or [])
        if len(values) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(v == "" for v in values):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed when 'stream' is true")
        return self

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def requested_max_tokens(self) -> int | None:
        # `max_tokens` is deprecated in favour of `max_completion_tokens`; the newer one wins.
        return self.max_completion_tokens or self.max_tokens

    def _requested_outputs(self) -> list[Requested]:
        found = from_structured_outputs(self.structured_outputs) if self.structured_outputs else []
        return found + from_guided_fields(
            self.guided_json, self.guided_regex, self.guided_choice, self.guided_grammar
        )

    @cached_property
    def requested_constraint(self) -> Requested | None:
        """What the answer must match, and the parameter that asked for it; `BadRequest` for a
        bad constraint or for two."""
        return the_one_constraint(self._requested_outputs())

    @property
    def output_constraint(self) -> StructuredOutput | None:
        requested = self.requested_constraint
        return requested[1] if requested else None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # OpenAI's default (null) is true

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_word(cls, value: Any) -> Any:
        return check_tool_choice_word(value)

    def _requested_outputs(self) -> list[Requested]:
        found = from_response_format(self.response_format) if self.response_format else []
        return found + super()._requested_outputs()

    @cached_property
    def tool_policy(self) -> ToolPolicy | None:
        """The tools the model may call and how, or None (no tools, or tool_choice "none")."""
        return tool_policy(self.tools, self.tool_choice, self.parallel_tool_calls)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    max_tokens: int | None = Field(DEFAULT_COMPLETION_MAX_TOKENS, ge=1)
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts_only(cls, value: Any) -> Any:
        if isinstance(value, list) and value and not all(isinstance(v, str) for v in value):
            raise ValueError("prompts given as token ids are not supported; send text")
        return value

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt)


_Request = TypeVar("_Request", bound=SamplingRequest)

_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _validate(model: type[_Request], body: Any) -> _Request:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _as_api_error(exc.errors(include_url=False)) from None


def _as_api_error(errors: Sequence[Any]) -> ApiError:
    first = errors[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    described = [
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg'].removeprefix('Value error, ')}"
        for e in errors[:3]
    ]
    message = "; ".join(described) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")
    if first["type"] in _RANGE_ERRORS:
        return ParamOutOfRange(message, param=param)
    return BadRequest(message, param=param)


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    request = _validate(ChatCompletionRequest, body)
    if request.logprobs or request.top_logprobs:
        raise BadRequest("logprobs are not supported by this server", param="logprobs")
    policy, constrained = request.tool_policy, request.requested_constraint
    if constrained is not None and policy is not None:
        raise BadRequest(
            f"'{constrained[0]}' and 'tools' cannot be combined: tool calls constrain the "
            "answer already (or send tool_choice 'none')",
            param=constrained[0],
        )
    return request


def parse_completion_request(body: Any) -> CompletionRequest:
    request = _validate(CompletionRequest, body)
    if not request.prompts:
        raise BadRequest("'prompt' must not be an empty list", param="prompt")
    if request.logprobs:
        raise BadRequest("logprobs are not supported by this server", param="logprobs")
    if request.suffix:
        raise BadRequest("'suffix' (insertion) is not supported by this server", "suffix")
    if request.best_of is not None and request.best_of != request.n:
        raise BadRequest("'best_of' different from 'n' is not supported", param="best_of")
    request.requested_constraint  # noqa: B018 - checks the constraint now, before any work
    if len(request.prompts) * request.n > MAX_CHOICES:
        raise ParamOutOfRange(
            f"{len(request.prompts)} prompts x n={request.n} asks for more than "
            f"{MAX_CHOICES} completions",
            param="n",
        )
    return request
