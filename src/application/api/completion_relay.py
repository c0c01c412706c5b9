"""What chat and text completions share: a place under the request limit, then the worker
streams of the jobs the use case built, relayed as one OpenAI reply.

A use case routes its request and builds its jobs inside `admit()`, then hands them to `run`.
A reply is either a whole body (non-streaming) or a `ResponseStream` of OpenAI chunks whose
`aclose()` the HTTP layer calls whatever happens, so a client that goes away stops its
generations at the worker and frees its place.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vilaserve.application.api.generation_session import GenerationSession, OpenChoice, open_choices
from vilaserve.application.api.metrics import ApiMetrics, RequestMeter
from vilaserve.application.api.model_router import ModelRouter, Route
from vilaserve.domain.api.errors import (
    ApiError,
    NoWorker,
    Overloaded,
    UpstreamFailure,
    as_api_error,
)
from vilaserve.domain.api.openai_responses import (
    ChoiceFinished,
    ResponseFormat,
    TextDelta,
    combine_usage,
)
from vilaserve.domain.api.worker_jobs import WorkerJob
from vilaserve.domain.shared.errors import Unavailable, WorkerUnavailable
from vilaserve.domain.shared.worker_gateway import WorkerGateway

log = logging.getLogger(__name__)


class Admission:
    """A bound on the requests the API holds at once; beyond it clients get a 429 to retry."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the request limit must be >= 1, got {limit}")
        self._limit = limit
        self._active = 0

    @property
    def active(self) -> int:
        return self._active

    def enter(self) -> None:
        if self._active >= self._limit:
            raise Overloaded(
                f"the server is handling {self._active} requests, its limit; retry later"
            )
        self._active += 1

    def leave(self) -> None:
        self._active = max(0, self._active - 1)


@dataclass
class AdmittedRequest:
    """A request inside the limit: when it arrived, and whether its reply holds its place now."""

    received: float
    reply_holds_place: bool = False


class ResponseStream:
    """The chunks (JSON-ready dicts) of one streamed reply; the last may be an error object."""

    def __init__(
        self, chunks: AsyncIterator[dict[str, Any]], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        self._chunks = chunks
        self._on_close = on_close

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._chunks

    async def aclose(self) -> None:
        close = getattr(self._chunks, "aclose", None)
        if close is not None:
            await close()
        await self._on_close()


@dataclass(frozen=True)
class Reply:
    body: dict[str, Any] | None = None
    stream: ResponseStream | None = None


@dataclass(frozen=True)
class RunOptions:
    stream: bool = False
    include_usage: bool = False
    choices_per_prompt: int = 1


class CompletionRelay:
    def __init__(
        self,
        router: ModelRouter,
        gateway: WorkerGateway,
        metrics: ApiMetrics,
        admission: Admission,
    ) -> None:
        self._router = router
        self._gateway = gateway
        self._metrics = metrics
        self._admission = admission

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[AdmittedRequest]:
        """A place under the limit (`Overloaded`, a 429, beyond it) for routing the request and
        building its jobs. From `run`'s reply on the place is the reply's, given back when it
        ends; leaving the block without one (an error, a cancellation) gives it back."""
        admitted = AdmittedRequest(self._metrics.now())
        self._admission.enter()
        try:
            yield admitted
        finally:
            if not admitted.reply_holds_place:
                self._admission.leave()

    async def run(
        self,
        admitted: AdmittedRequest,
        route: Route,
        jobs: Sequence[WorkerJob],
        fmt: ResponseFormat,
        options: RunOptions,
    ) -> Reply:
        """Opens the jobs' worker streams on `route`, then collects them into one body or
        relays them as chunks. Raises what keeps them from starting."""
        model = route.model
        meter = self._metrics.start(model, admitted.received)
        try:
            route, choices = await self._open(route, jobs)
        except (ApiError, Unavailable) as error:
            meter.failed(as_api_error(error).error_type)
            raise
        except BaseException:
            meter.failed("cancelled")
            raise
        admitted.reply_holds_place = True
        session = GenerationSession(choices)
        closer = _Closer(session, meter, self._admission)
        log.info(
            "completion started",
            extra={
                "model": model,
                "worker": route.address,
                "choices": len(jobs),
                "images": len(jobs[0].images) if jobs else 0,
                "stream": options.stream,
            },
        )
        if not options.stream:
            try:
                return Reply(body=await self._collect(session, meter, fmt, options, model))
            finally:
                await closer()
        chunks = self._chunks(session, meter, fmt, options, model)
        return Reply(stream=ResponseStream(chunks, closer))

    async def _open(
        self, route: Route, jobs: Sequence[WorkerJob]
    ) -> tuple[Route, list[OpenChoice]]:
        """The streams, and the route they run on: the worker may have been failed over."""
        try:
            return route, await open_choices(self._gateway, route.address, jobs)
        except WorkerUnavailable as exc:
            failure = exc
        # Nothing was sent to the client yet: another worker can still take the jobs.
        route = await self._router.failover(route.model, failure, route)
        return route, await open_choices(self._gateway, route.address, jobs)

    async def _collect(
        self,
        session: GenerationSession,
        meter: RequestMeter,
        fmt: ResponseFormat,
        options: RunOptions,
        model: str,
    ) -> dict[str, Any]:
        texts = [""] * session.size
        finished: list[ChoiceFinished] = []
        try:
            async for event in session.events():
                if isinstance(event, TextDelta):
                    meter.text_arrived(event.index)
                    texts[event.index] += event.text
                else:
                    meter.choice_finished(event)
                    finished.append(event)
        except (ApiError, Unavailable) as exc:
            error = as_api_error(exc)
            self._failed(meter, error, model)
            raise error from exc
        except Exception as exc:
            meter.failed("server_error")
            raise UpstreamFailure(f"generation failed: {type(exc).__name__}: {exc}") from exc
        usage = combine_usage(finished, options.choices_per_prompt)
        meter.succeeded(usage)
        _log_done(model, finished, usage.to_dict())
        return fmt.body(texts, finished, usage)

    async def _chunks(
        self,
        session: GenerationSession,
        meter: RequestMeter,
        fmt: ResponseFormat,
        options: RunOptions,
        model: str,
    ) -> AsyncIterator[dict[str, Any]]:
        for chunk in fmt.opening_chunks(session.size):
            yield chunk
        finished: list[ChoiceFinished] = []
        try:
            async for event in session.events():
                if isinstance(event, TextDelta):
                    meter.text_arrived(event.index)
                    for chunk in fmt.text_chunks(event.index, event.text):
                        yield chunk
                else:
                    meter.choice_finished(event)
                    finished.append(event)
                    for chunk in fmt.closing_chunks(event.index, event.finish_reason):
                        yield chunk
        except (ApiError, Unavailable) as exc:
            # Headers are gone already: the error travels as an OpenAI error event.
            error = as_api_error(exc)
            self._failed(meter, error, model)
            yield error.to_dict()
            return
        except Exception as exc:
            log.exception("stream crashed", extra={"model": model})
            meter.failed("server_error")
            yield UpstreamFailure(f"generation failed: {type(exc).__name__}: {exc}").to_dict()
            return
        usage = combine_usage(finished, options.choices_per_prompt)
        meter.succeeded(usage)
        _log_done(model, finished, usage.to_dict())
        if options.include_usage:
            yield fmt.usage_chunk(usage)

    def _failed(self, meter: RequestMeter, error: ApiError, model: str) -> None:
        meter.failed(error.error_type)
        if isinstance(error, NoWorker):
            self._router.forget(model)
        log.info(
            "completion failed",
            extra={
                "model": model,
                "status": error.status,
                "error_code": int(error.code),
                "reason": error.message,
            },
        )


class _Closer:
    """Ends a request once: stops its worker streams and gives back its admission place."""

    def __init__(self, session: GenerationSession, meter: RequestMeter, admission: Admission):
        self._session = session
        self._meter = meter
        self._admission = admission
        self._done = False

    async def __call__(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            await self._session.aclose()
        finally:
            self._meter.failed("cancelled")  # no-op when the request already ended
            self._admission.leave()


def _log_done(model: str, finished: Sequence[ChoiceFinished], usage: dict[str, int]) -> None:
    reasons = sorted({e.finish_reason for e in finished})
    log.info("completion done", extra={"model": model, "finish_reasons": reasons, **usage})
