"""What chat and text completions share: route, plan the worker jobs, run them, answer.

A reply is either a whole body (non-streaming) or a `ResponseStream` of OpenAI chunks whose
`aclose()` the HTTP layer calls whatever happens, so a client that goes away stops its
generations at the worker and frees its place.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vilaserve.application.api.admission import Admission
from vilaserve.application.api.generation_session import GenerationSession, OpenChoice, open_choices
from vilaserve.application.api.metrics import ApiMetrics, RequestMeter
from vilaserve.application.api.model_router import ModelInfo, ModelRouter, Route
from vilaserve.domain.api.errors import ApiError, NoWorker, UpstreamFailure, as_api_error
from vilaserve.domain.api.openai_responses import (
    ChoiceFinished,
    ResponseFormat,
    TextDelta,
    combine_usage,
)
from vilaserve.domain.api.ports import WorkerApi
from vilaserve.domain.api.worker_jobs import WorkerJob
from vilaserve.domain.shared.errors import Unavailable, WorkerUnavailable

log = logging.getLogger(__name__)

Planner = Callable[[ModelInfo], Awaitable[Sequence[WorkerJob]]]


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
        workers: WorkerApi,
        metrics: ApiMetrics,
        admission: Admission,
    ) -> None:
        self._router = router
        self._workers = workers
        self._metrics = metrics
        self._admission = admission

    async def run(
        self, model: str, plan: Planner, fmt: ResponseFormat, options: RunOptions
    ) -> Reply:
        received = self._metrics.now()
        self._admission.enter()
        try:
            route = await self._router.route(model)
            jobs = await plan(route.info)
            meter = self._metrics.start(model, received)
            try:
                choices = await self._open(route, jobs)
            except (ApiError, Unavailable) as error:
                meter.failed(as_api_error(error).error_type)
                raise
            except BaseException:
                meter.failed("cancelled")
                raise
        except BaseException:
            self._admission.leave()
            raise
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

    async def _open(self, route: Route, jobs: Sequence[WorkerJob]) -> list[OpenChoice]:
        try:
            return await open_choices(self._workers, route.address, jobs)
        except WorkerUnavailable:
            # Nothing was sent to the client yet: tell the controller, and try once more on
            # whichever worker it names now (another one, or the same if it is back).
            await self._router.report_unreachable(route.model, route.address)
        fresh = await self._router.route(route.model)
        return await open_choices(self._workers, fresh.address, jobs)

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
                    yield fmt.delta_chunk(event.index, event.text)
                else:
                    meter.choice_finished(event)
                    finished.append(event)
                    yield fmt.finish_chunk(event.index, event.finish_reason)
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
