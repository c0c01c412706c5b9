"""The worker's main use case: one request in, a stream of cumulative-text chunks out.

Every failure, whatever its layer, leaves here as one chunk with a FastChat error code and a
message naming the cause; one bad request never disturbs another.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from vilaserve.application.worker.engine.observer import FirstTokenObserver
from vilaserve.application.worker.image_payloads import (
    DEFAULT_MAX_IMAGE_BYTES,
    decode_image_payload,
)
from vilaserve.application.worker.prompt_bounds import check_prompt_chars
from vilaserve.domain.shared.errors import ErrorCode, InvalidRequest, ServingError
from vilaserve.domain.shared.generation import (
    DEFAULT_MAX_NEW_TOKENS_CAP,
    IMAGE_PLACEHOLDER,
    FinishReason,
    GenerationRequest,
    PromptTimings,
    StreamChunk,
    Usage,
    parse_generation_request,
)
from vilaserve.domain.worker.first_token import NO_IMAGES, FirstTokenParts
from vilaserve.domain.worker.ports import (
    Admitted,
    CompiledConstraint,
    ConstraintCompiler,
    ImageFeatures,
    TextGenerator,
    VisionEncoder,
)
from vilaserve.domain.worker.stop_strings import StopStringMatcher

log = logging.getLogger(__name__)

# FastChat's OpenAI server puts one `$$<image>$$` marker *and* one `<image>\n` per image.
FASTCHAT_IMAGE_MARKER = "$$<image>$$"


@dataclass(frozen=True)
class GenerationLimits:
    max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP
    stream_interval: int = 1
    max_images: int = 16
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_prompt_chars: int | None = None  # None: CHARS_PER_POSITION x the context


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: `model_prompt` is what the model reads, `request.prompt` is echoed."""

    request: GenerationRequest
    model_prompt: str
    image_files: tuple[bytes, ...]


def error_chunk(error: ServingError) -> StreamChunk:
    return StreamChunk(text=error.message, error_code=int(error.code))


class GenerateStream:
    def __init__(
        self,
        generator: TextGenerator,
        vision: VisionEncoder | None,
        limits: GenerationLimits,
        observer: FirstTokenObserver | None = None,
        constraints: ConstraintCompiler | None = None,
    ) -> None:
        """`observer`: hears where each request's time to first token went (/metrics).
        `constraints`: compiles the requests' `structured_outputs`; without one they are
        refused."""
        self._generator = generator
        self._vision = vision
        self._limits = limits
        self._observer = observer
        self._constraints = constraints

    def prepare(self, body: Any) -> PreparedRequest:
        """Checks everything that needs no model; raises `ServingError` naming the problem."""
        request = parse_generation_request(body, self._limits.max_new_tokens_cap)
        check_prompt_chars(
            request.prompt, self._generator.context_length, self._limits.max_prompt_chars
        )
        model_prompt = _normalise_placeholders(request.prompt, len(request.images))
        placeholders = model_prompt.count(IMAGE_PLACEHOLDER)
        if self._vision is None and request.images:
            raise InvalidRequest("this model takes no images, but the request has some")
        if placeholders != len(request.images):
            raise InvalidRequest(
                f"the prompt has {placeholders} '{IMAGE_PLACEHOLDER}' placeholders but "
                f"{len(request.images)} images were sent; they must match one to one"
            )
        if request.constraint is not None and self._constraints is None:
            raise InvalidRequest(
                "'structured_outputs' cannot be served here: this worker has no constraint "
                "compiler for its model's tokenizer"
            )
        if len(request.images) > self._limits.max_images:
            raise InvalidRequest(
                f"{len(request.images)} images sent; at most {self._limits.max_images} allowed"
            )
        files = tuple(
            decode_image_payload(p, i, self._limits.max_image_bytes)
            for i, p in enumerate(request.images)
        )
        template = self._generator.conversation_template
        params = request.params
        own_stops = () if params.ignore_eos else template.stop_str
        stop = tuple(dict.fromkeys((*params.stop, *own_stops)))
        request_id = request.request_id or uuid.uuid4().hex[:16]
        request = replace(request, params=replace(params, stop=stop), request_id=request_id)
        log.info(
            "request accepted",
            extra={
                "request_id": request_id,
                "prompt_chars": len(request.prompt),
                "images": len(files),
                "image_bytes": sum(len(f) for f in files),
                "max_new_tokens": params.max_new_tokens,
                "greedy": params.is_greedy,
                # Only on constrained requests: the others' log lines stay as they were.
                **({"constraint": request.constraint.kind} if request.constraint else {}),
            },
        )
        return PreparedRequest(request, model_prompt, files)

    async def stream(self, prepared: PreparedRequest) -> AsyncIterator[StreamChunk]:
        """Never raises: failures end the stream with one error chunk."""
        request = prepared.request
        prefix = request.prompt if request.echo else ""
        started = time.perf_counter()
        try:
            # Accepted or refused before any work; counted as waiting until its sequence runs,
            # it waits for its turn (a bounded number are served at once), then is encoded.
            admitted = self._generator.admit()
            try:
                async with admitted.turn():
                    waited = _Waited(started, time.perf_counter() - started)
                    # Before the pictures: a constraint that does not compile is refused
                    # before any work on the model's thread.
                    constraint = await self._compile(prepared)
                    features = await self._encode(prepared.image_files)
                    # aclosing: a client that goes away must stop the model, not this loop.
                    generation = self._generate(
                        prepared, features, prefix, admitted, waited, constraint
                    )
                    async with aclosing(generation) as chunks:
                        async for chunk in chunks:
                            yield chunk
            finally:
                admitted.leave()  # however it ended (a sequence still in the engine: soon)
            log.info(
                "request done",
                extra={
                    "request_id": request.request_id,
                    "finish_reason": chunk.finish_reason,
                    **(chunk.usage.to_dict() if chunk.usage else {}),
                    "seconds": round(time.perf_counter() - started, 3),
                },
            )
        except ServingError as error:
            log.info(
                "request failed",
                extra={
                    "request_id": request.request_id,
                    "error_code": int(error.code),
                    "reason": error.message,
                },
            )
            yield error_chunk(error)
        except Exception as exc:  # the worker must survive anything one request triggers
            log.exception("request crashed", extra={"request_id": request.request_id})
            yield StreamChunk(
                text=f"internal error: {type(exc).__name__}: {exc}",
                error_code=int(ErrorCode.INTERNAL_ERROR),
            )

    async def _compile(self, prepared: PreparedRequest) -> CompiledConstraint | None:
        constraint = prepared.request.constraint
        if constraint is None:
            return None
        assert self._constraints is not None  # prepare() refused constraints without a compiler
        # A big schema compiles for milliseconds or more: never on the event loop's thread.
        return await asyncio.to_thread(self._constraints.compile, constraint)

    async def _encode(self, files: tuple[bytes, ...]) -> ImageFeatures | None:
        if not files:
            return None
        assert self._vision is not None  # prepare() refused images for a text-only model
        return await self._vision.encode(files)

    async def _generate(
        self,
        prepared: PreparedRequest,
        features: ImageFeatures | None,
        prefix: str,
        admitted: Admitted,
        waited: _Waited,
        constraint: CompiledConstraint | None,
    ) -> AsyncIterator[StreamChunk]:
        params = prepared.request.params
        matcher = StopStringMatcher(params.stop)
        interval = self._limits.stream_interval
        text = ""
        usage = Usage(0, 0)
        finish: FinishReason | None = None
        unsent = 0
        first = True
        steps = self._generator.generate(
            prepared.model_prompt, features, params, admitted, constraint=constraint
        )
        async with aclosing(steps):
            async for step in steps:
                if first:
                    first = False
                    self._first_token(prepared, features, waited, step.timings)
                scan = matcher.push(step.text)
                text += scan.emit
                usage = Usage(step.prompt_tokens, step.completion_tokens)
                if scan.stopped:
                    finish = "stop"
                    break
                if step.finish_reason is not None:
                    text += matcher.flush()
                    finish = step.finish_reason
                    break
                unsent += 1
                if unsent >= interval and scan.emit:
                    unsent = 0
                    yield StreamChunk(text=prefix + text, usage=usage)
        if finish is None:  # the generator ended without saying why: treat as a length stop
            text += matcher.flush()
            finish = "length"
        yield StreamChunk(text=prefix + text, usage=usage, finish_reason=finish)

    def _first_token(
        self,
        prepared: PreparedRequest,
        features: ImageFeatures | None,
        waited: _Waited,
        timings: PromptTimings | None,
    ) -> None:
        """Once per request: where its time to first token went, logged and observed."""
        images = features.timings if features is not None else NO_IMAGES
        parts = FirstTokenParts.of(waited.turn_s, images, timings)
        log.info(
            "first token",
            extra={
                "request_id": prepared.request.request_id,
                "ttft_s": round(time.perf_counter() - waited.started, 3),
                **{f"{name}_s": round(s, 3) for name, s in parts.by_name().items()},
            },
        )
        if self._observer is not None:
            self._observer.first_token_parts(parts)


@dataclass(frozen=True)
class _Waited:
    """When a request's stream started, and how long it then waited for its turn."""

    started: float
    turn_s: float


def _normalise_placeholders(prompt: str, n_images: int) -> str:
    """Drop FastChat's extra `$$<image>$$` markers so each image has one `<image>`."""
    if FASTCHAT_IMAGE_MARKER not in prompt:
        return prompt
    if prompt.count(FASTCHAT_IMAGE_MARKER) == n_images and (
        prompt.count(IMAGE_PLACEHOLDER) == 2 * n_images
    ):
        return prompt.replace(FASTCHAT_IMAGE_MARKER, "")
    return prompt.replace(FASTCHAT_IMAGE_MARKER, IMAGE_PLACEHOLDER)
