"""A model worker as a Ray Serve replica: the worker's engine in the replica's own process.

The class is plain Python; the Ray entrypoint (entrypoints/ray/app.py) makes it a deployment,
so nothing here imports Ray. The replica is built with a function that loads the model (once,
in the replica's constructor) and hands back the worker's use cases, the same objects the HTTP
worker's routes call: a request is checked, refused and streamed exactly as
/worker_generate_stream would, and its frames are the same bytes (`json + b"\\0"`).

Ray Serve calls `check_health` every few seconds: it asks the model thread to answer (a no-op
queued behind the engine's steps). A thread that is busy is not a dead one: one prefill of a
3B model's picture on one CPU core takes 35 s, longer than Ray Serve waits for a check. So a
probe not answered within a few seconds stays pending and the checks that follow pass while it
is younger than `stuck_after_s`; only an engine that has answered nothing for that long (or
whose thread is gone) fails them, and Ray Serve restarts the replica.
A cancelled call (the client went away, or the API gave up) reaches the generator here as a
cancellation, which closes the use case's stream, which takes the sequence out of the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from vilaserve.application.worker.describe_model import DescribeModel
from vilaserve.application.worker.generate_stream import GenerateStream, error_chunk
from vilaserve.application.worker.report_status import ReportStatus
from vilaserve.domain.shared.errors import InvalidRequest, ServingError
from vilaserve.domain.shared.worker_gateway import FRAME_SEPARATOR
from vilaserve.domain.worker.ports import ModelRunner, TextGenerator

log = logging.getLogger(__name__)

# Ray Serve's own health check times out after 30 s by default: answer well within it.
DEFAULT_LIVENESS_TIMEOUT_S = 5.0
# The longest one engine step may take before the engine counts as stuck (a long prompt's
# prefill on a slow CPU; steps are milliseconds to seconds on a GPU).
DEFAULT_STUCK_AFTER_S = 300.0


@dataclass(frozen=True)
class ReplicaServices:
    """What a replica serves with: the worker's use cases over one loaded model."""

    generate: GenerateStream
    describe: DescribeModel
    report_status: ReportStatus
    generator: TextGenerator
    runner: ModelRunner[Any]  # its model thread answers the liveness check
    render_metrics: Callable[[], str]  # the engine's Prometheus text, as the worker's /metrics


class EngineNotAlive(RuntimeError):
    """The engine's model thread did not answer: Ray Serve restarts the replica."""


def encode_frame(frame: dict[str, Any]) -> bytes:
    """One frame as the worker's HTTP route writes it."""
    return json.dumps(frame, ensure_ascii=False).encode() + FRAME_SEPARATOR


class WorkerReplica:
    def __init__(
        self,
        build: Callable[..., ReplicaServices],
        *build_args: Any,
        liveness_timeout_s: float = DEFAULT_LIVENESS_TIMEOUT_S,
        stuck_after_s: float = DEFAULT_STUCK_AFTER_S,
    ) -> None:
        """`build(*build_args)` loads the model and returns its use cases; it runs here, in
        the replica's process, so the model is loaded once per replica."""
        self._services = build(*build_args)
        self._probe = LivenessProbe(self._services.runner, liveness_timeout_s, stuck_after_s)
        log.info("replica ready", extra={"model": self._services.describe.details().name})

    async def generate_stream(
        self, body: bytes, affinity_key: str | None = None
    ) -> AsyncIterator[bytes]:
        """The worker's /worker_generate_stream for a JSON `body`: its frames, one per chunk;
        a refusal is one error frame. `affinity_key` is for the router only (which replica
        this conversation belongs to)."""
        generate = self._services.generate
        try:
            prepared = generate.prepare(_json(body))
        except ServingError as error:
            reason = {"error_code": int(error.code), "reason": error.message}
            log.info("request refused", extra=reason)
            yield encode_frame(error_chunk(error).to_dict())
            return
        async with aclosing(generate.stream(prepared)) as chunks:
            async for chunk in chunks:
                yield encode_frame(chunk.to_dict())

    async def get_status(self) -> dict[str, Any]:
        return self._services.report_status().to_dict()

    async def model_details(self) -> dict[str, object]:
        return self._services.describe.details().to_dict()

    async def conversation_template(self) -> dict[str, Any]:
        return {"conv": self._services.describe.conversation_template().to_fastchat_dict()}

    async def metrics(self) -> str:
        """The engine's load, caches and latencies in Prometheus text (the worker's /metrics)."""
        return self._services.render_metrics()

    async def check_health(self) -> None:
        """Raises `EngineNotAlive` when the model thread is gone or has been stuck too long."""
        await self._probe.check()


class LivenessProbe:
    """Asks the model thread to run a no-op and tells a busy engine from a stuck one: a probe
    not answered within `timeout_s` is kept, not repeated, and the engine counts as stuck only
    once that probe is `stuck_after_s` old."""

    def __init__(
        self, runner: ModelRunner[Any], timeout_s: float, stuck_after_s: float, clock: Any = None
    ) -> None:
        self._runner = runner
        self._timeout_s = timeout_s
        self._stuck_after_s = stuck_after_s
        self._clock = clock or time.monotonic
        self._pending: asyncio.Future[None] | None = None
        self._sent_at = 0.0

    async def check(self) -> None:
        if self._pending is None:
            self._pending = self._send()
            self._sent_at = self._clock()
        # Waits for the answer, but never past `timeout_s`; how the probe ended is read below.
        await asyncio.wait({self._pending}, timeout=self._timeout_s)
        if self._pending.done():
            failure = self._pending.exception()
            self._pending = None
            if failure is not None:
                raise EngineNotAlive(f"the engine's model thread is gone ({failure})")
            return
        waited = self._clock() - self._sent_at
        if waited > self._stuck_after_s:
            raise EngineNotAlive(
                f"the engine's model thread did not answer for {waited:.0f} s "
                f"(stuck after {self._stuck_after_s:g} s)"
            )

    def _send(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[None] = loop.create_future()

        def answer() -> None:
            loop.call_soon_threadsafe(lambda: answered.done() or answered.set_result(None))

        try:
            self._runner.submit(answer)
        except RuntimeError as exc:  # its executor was shut down
            answered.set_exception(exc)
        return answered


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON ({exc})") from exc
