"""The worker streams of one API request (one per choice), opened together and merged.

Each stream's first chunk is read before the request is answered, so a refusal (bad image,
prompt too long, queue full) still becomes a proper HTTP status instead of an error event in
an already-started stream. The worker's frames are read here into `StreamChunk`s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from vilaserve.domain.api.errors import from_worker_error
from vilaserve.domain.api.openai_responses import (
    ChoiceEvent,
    ChoiceFinished,
    CumulativeText,
    TextDelta,
)
from vilaserve.domain.api.worker_jobs import WorkerJob
from vilaserve.domain.shared.errors import WorkerUnavailable
from vilaserve.domain.shared.generation import StreamChunk, Usage
from vilaserve.domain.shared.worker_gateway import WorkerGateway

Frame = dict[str, Any]
# "grammar_error": the answer's constraint left no way to go on; it reaches the client as is.
KNOWN_FINISH_REASONS = ("stop", "length", "grammar_error")


@dataclass
class OpenChoice:
    index: int
    first: StreamChunk
    rest: AsyncIterator[Frame]  # the worker's stream itself: closing it stops the generation


def _chunk(frame: Any) -> StreamChunk:
    """A `/worker_generate_stream` frame (cumulative `text`) as the API reads it."""
    if not isinstance(frame, dict):
        return StreamChunk(
            text=f"the worker sent a malformed chunk: {frame!r:.200}", error_code=50001
        )
    usage = frame.get("usage")
    finish = frame.get("finish_reason")
    return StreamChunk(
        text=str(frame.get("text") or ""),
        error_code=int(frame.get("error_code") or 0),
        usage=Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        if isinstance(usage, dict)
        else None,
        # Anything else a foreign worker may send (e.g. "abort") still ends the choice.
        finish_reason=finish if finish in KNOWN_FINISH_REASONS else ("stop" if finish else None),
    )


async def _close(stream: AsyncIterator[Frame]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


async def _open_one(gateway: WorkerGateway, address: str, index: int, job: WorkerJob) -> OpenChoice:
    stream = gateway.stream_generate(address, job.to_payload())
    try:
        first = _chunk(await anext(stream))
    except StopAsyncIteration:
        raise WorkerUnavailable(address, "it closed the stream without answering") from None
    except BaseException:
        await _close(stream)
        raise
    if first.error_code:
        await _close(stream)
        raise from_worker_error(first.error_code, first.text)
    return OpenChoice(index, first, stream)


async def open_choices(
    gateway: WorkerGateway, address: str, jobs: Sequence[WorkerJob]
) -> list[OpenChoice]:
    """Starts every job at once and waits for each one's first chunk; all or nothing."""
    tasks = [asyncio.ensure_future(_open_one(gateway, address, i, j)) for i, j in enumerate(jobs)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, OpenChoice):
                await _close(outcome.rest)
        raise


async def _choice_events(choice: OpenChoice) -> AsyncIterator[ChoiceEvent]:
    text = CumulativeText()
    last = choice.first
    async for chunk in _chunks(choice.first, choice.rest):
        if chunk.error_code:
            raise from_worker_error(chunk.error_code, chunk.text)
        last = chunk
        final = chunk.finish_reason is not None
        delta = text.advance(chunk.text, final)
        if delta:
            yield TextDelta(choice.index, delta)
        if final:
            yield ChoiceFinished(choice.index, str(chunk.finish_reason), _usage(chunk))
            return
    # LLaVA- and TinyChat-style workers end the stream without a finish reason.
    delta = text.advance(last.text, final=True)
    if delta:
        yield TextDelta(choice.index, delta)
    yield ChoiceFinished(choice.index, "stop", _usage(last))


def _usage(chunk: StreamChunk) -> Usage:
    return chunk.usage or Usage(0, 0)


async def _chunks(first: StreamChunk, rest: AsyncIterator[Frame]) -> AsyncIterator[StreamChunk]:
    yield first
    async for frame in rest:
        yield _chunk(frame)


_END = object()


class GenerationSession:
    """Merges the choices' events in arrival order; `aclose()` stops every worker stream."""

    def __init__(self, choices: Sequence[OpenChoice]) -> None:
        self._choices = list(choices)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def size(self) -> int:
        return len(self._choices)

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        queue: asyncio.Queue[object] = asyncio.Queue()

        async def pump(choice: OpenChoice) -> None:
            try:
                async for event in _choice_events(choice):
                    await queue.put(event)
            except Exception as exc:
                await queue.put(exc)
            finally:
                await queue.put(_END)

        self._tasks = [asyncio.ensure_future(pump(c)) for c in self._choices]
        remaining = len(self._tasks)
        while remaining:
            item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item  # type: ignore[misc]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for choice in self._choices:
            await _close(choice.rest)
