"""Generation requests, their sampling parameters, and the chunks streamed back.

Parsing lives here (not in the HTTP layer) so that every entrypoint (worker protocol, OpenAI
API, CLI) applies the same rules and the same error messages.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from vilaserve.domain.shared.body_fields import flag
from vilaserve.domain.shared.errors import InvalidRequest, ParamOutOfRange

# "grammar_error": the request's output constraint left no token to continue with (the text
# so far is kept); see `OutputConstraint`.
FinishReason = Literal["stop", "length", "grammar_error"]

GREEDY_TEMPERATURE = 1e-5
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_MAX_NEW_TOKENS_CAP = 1024
IMAGE_PLACEHOLDER = "<image>"
SEED_LIMIT = 2**63


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Validated on construction."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    # vLLM's and llama-server's flag: the model's own end-of-turn tokens and strings do not end
    # the answer (benchmarks measure exactly max_new_tokens); `stop` and `stop_token_ids` still do.
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ParamOutOfRange(f"temperature must be >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise ParamOutOfRange(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ParamOutOfRange(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ParamOutOfRange(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed is not None and not -SEED_LIMIT <= self.seed < SEED_LIMIT:
            raise ParamOutOfRange(f"seed must fit in 64 bits, got {self.seed}")
        if any(s == "" for s in self.stop):
            raise ParamOutOfRange("stop strings must not be empty")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


ConstraintKind = Literal["json", "json_object", "regex", "choice", "grammar"]
CONSTRAINT_KINDS: tuple[ConstraintKind, ...] = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class OutputConstraint:
    """What the answer must match (the worker protocol's `structured_outputs`, vLLM's names).

    `spec` is canonical text: the JSON schema as compact JSON (its keys in the order given,
    since property order is the order the answer's keys come in), the regex, the choices as a
    JSON list, the Lark grammar; "" for `json_object`. Only its shape is checked here; whether
    it compiles is the worker's constraint compiler's to say.
    """

    kind: ConstraintKind
    spec: str

    @property
    def key(self) -> str:
        """Names the constraint in caches: equal constraints, equal keys."""
        return hashlib.sha256(f"{self.kind}\0{self.spec}".encode()).hexdigest()


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt, the base64 images its `<image>` placeholders refer to, and how to sample.

    `constraint`: what the answer must match; None (the default) leaves it free."""

    prompt: str
    images: tuple[str, ...] = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    echo: bool = True
    request_id: str = ""
    constraint: OutputConstraint | None = None

    @property
    def image_placeholder_count(self) -> int:
        return self.prompt.count(IMAGE_PLACEHOLDER)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class PromptTimings:
    """How a generator spent a request's time up to its first token, in seconds: waiting for
    its turn inside the generator (a cache row, the model's thread), the steps that prefilled
    its prompt (whole steps: what the request waited for), and the sampling of that token."""

    queue_s: float = 0.0
    prefill_s: float = 0.0
    first_sample_s: float = 0.0


@dataclass(frozen=True)
class GenerationStep:
    """What a `TextGenerator` yields: newly decoded text and the running counts.

    `text` is the delta since the previous step. `finish_reason` is set on the last step only.
    `timings`: on the first step only, from a generator that measures them.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    timings: PromptTimings | None = None


@dataclass(frozen=True)
class StreamChunk:
    """One `\\0`-delimited JSON object of the worker protocol; `text` is cumulative."""

    text: str
    error_code: int = 0
    usage: Usage | None = None
    finish_reason: FinishReason | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "error_code": self.error_code,
            "usage": self.usage.to_dict() if self.usage else None,
            "finish_reason": self.finish_reason,
        }


# --- parsing of the worker protocol's JSON body -------------------------------------------


def _number(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"'{key}' must be a number, got {type(value).__name__}")
    return float(value)


def _integer(body: Mapping[str, Any], key: str, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{key}' must be an integer, got {type(value).__name__}")
    return value


def _string_list(body: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = body.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InvalidRequest(f"'{key}' must be a string or a list of strings")


def _int_list(body: Mapping[str, Any], key: str) -> tuple[int, ...]:
    value = body.get(key)
    if value is None:
        return ()
    if isinstance(value, Sequence) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return tuple(value)
    raise InvalidRequest(f"'{key}' must be a list of integers")


STRUCTURED_OUTPUTS = "structured_outputs"


def parse_output_constraint(value: Any) -> OutputConstraint | None:
    """`structured_outputs` as vLLM names it: an object with exactly one of `json` (a schema, or
    a string holding one), `json_object` (true), `regex`, `choice` (a list of strings) or
    `grammar` (Lark text). Absent or null: no constraint; a kind given as null is absent too
    (clients that serialize every field send the others that way)."""
    if value is None:
        return None
    field_name = STRUCTURED_OUTPUTS
    if not isinstance(value, Mapping):
        raise InvalidRequest(
            f"'{field_name}' must be an object with one of {_kinds_text()}, "
            f"got {type(value).__name__}"
        )
    unknown = sorted(str(k) for k in value if k not in CONSTRAINT_KINDS)
    if unknown:
        raise InvalidRequest(
            f"'{field_name}' has unknown key(s) {', '.join(map(repr, unknown))}; "
            f"expected one of {_kinds_text()}"
        )
    given = [kind for kind in CONSTRAINT_KINDS if value.get(kind) is not None]
    if len(given) != 1:
        named = f"it has {', '.join(map(repr, given))}" if given else "it has none"
        raise InvalidRequest(f"'{field_name}' must have exactly one of {_kinds_text()}; {named}")
    kind = given[0]
    return OutputConstraint(kind, _CONSTRAINT_SPECS[kind](value[kind], f"{field_name}.{kind}"))


def _kinds_text() -> str:
    return ", ".join(f"'{kind}'" for kind in CONSTRAINT_KINDS)


def _schema_spec(value: Any, name: str) -> str:
    try:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise InvalidRequest(f"'{name}' is not valid JSON: {exc}") from None
        if not isinstance(value, Mapping):
            raise InvalidRequest(
                f"'{name}' must be a JSON schema (an object, or a string holding one), "
                f"got {type(value).__name__}"
            )
        # ASCII: a schema sent as text may escape a lone surrogate, which no encoder takes.
        return json.dumps(value, separators=(",", ":"))
    except RecursionError:
        raise InvalidRequest(f"'{name}' is nested too deeply") from None


def _json_object_spec(value: Any, name: str) -> str:
    if value is not True:
        raise InvalidRequest(f"'{name}' must be true, got {value!r}")
    return ""


def _text_spec(what: str) -> Callable[[Any, str], str]:
    def spec(value: Any, name: str) -> str:
        if not isinstance(value, str) or not value:
            got = repr(value) if isinstance(value, str) else type(value).__name__
            raise InvalidRequest(f"'{name}' must be a non-empty string ({what}), got {got}")
        return value

    return spec


def _choice_spec(value: Any, name: str) -> str:
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or not value
        or not all(isinstance(choice, str) for choice in value)
    ):
        raise InvalidRequest(f"'{name}' must be a non-empty list of strings")
    return json.dumps(list(value), ensure_ascii=False)


_CONSTRAINT_SPECS: dict[str, Callable[[Any, str], str]] = {
    "json": _schema_spec,
    "json_object": _json_object_spec,
    "regex": _text_spec("a regular expression"),
    "choice": _choice_spec,
    "grammar": _text_spec("a Lark grammar"),
}


def parse_generation_request(
    body: Any, max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP
) -> GenerationRequest:
    """Build a request from the JSON body that TinyChat, LLaVA and FastChat clients send.

    Defaults follow FastChat (`temperature` 1.0, `top_p` 1.0, `max_new_tokens` 256, `echo`
    true). `max_new_tokens` above the cap is lowered to the cap, as TinyChat and LLaVA do.
    """
    if not isinstance(body, Mapping):
        raise InvalidRequest("the request body must be a JSON object")
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest("'prompt' is required")
    if not isinstance(prompt, str):
        raise InvalidRequest(f"'prompt' must be a string, got {type(prompt).__name__}")
    images = _string_list(body, "images")
    max_new = _integer(body, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    assert max_new is not None
    params = SamplingParams(
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=_integer(body, "top_k", -1) or -1,  # 0 means disabled, as in vLLM
        max_new_tokens=min(max_new, max_new_tokens_cap),
        stop=_string_list(body, "stop"),
        stop_token_ids=_int_list(body, "stop_token_ids"),
        seed=_integer(body, "seed", None),
        ignore_eos=flag(body, "ignore_eos", False),
    )
    echo = flag(body, "echo", True)
    request_id = body.get("request_id") or ""
    return GenerationRequest(
        prompt=prompt,
        images=images,
        params=params,
        echo=echo,
        request_id=str(request_id),
        constraint=parse_output_constraint(body.get(STRUCTURED_OUTPUTS)),
    )
