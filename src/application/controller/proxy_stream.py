"""The controller's `/worker_generate_stream`: pick a worker by `model`, relay its frames.

Frames are relayed one by one as the worker sends them. Every failure ends in exactly one error
frame (`CONTROLLER_NO_WORKER` or `CONTROLLER_WORKER_TIMEOUT`) with a message that names the model
or the worker, never FastChat's "no worker" followed by a second "timeout" frame.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from vilaserve.application.controller.worker_directory import WorkerDirectory
from vilaserve.domain.shared.controller_messages import requested_model
from vilaserve.domain.shared.errors import (
    NoWorkerForModel,
    ServingError,
    WorkerBusy,
    WorkerUnavailable,
)
from vilaserve.domain.shared.worker_gateway import WorkerGateway

log = logging.getLogger(__name__)

Frame = dict[str, Any]


def error_frame(error: ServingError) -> Frame:
    return {"text": error.message, "error_code": int(error.code)}


class ProxyGenerateStream:
    def __init__(self, directory: WorkerDirectory, gateway: WorkerGateway) -> None:
        self._directory = directory
        self._gateway = gateway

    async def open(self, body: Any) -> AsyncIterator[Frame]:
        """Chooses a worker and waits for its first frame.

        Raises `ServingError` when there is nothing to relay: a malformed body, no worker for the
        model (50005), or a worker that fails before its first frame (50006; it is dropped, and
        re-registers with its next heartbeat if it is in fact alive). Otherwise returns the
        frames, the first one included; a failure after that ends them with one error frame.
        """
        model = requested_model(body)
        address = self._directory.worker_address(model)
        if address is None:
            log.warning("no worker for the model", extra={"model": model})
            raise NoWorkerForModel(self._no_worker_message(model))
        log.info("relaying a generation", extra={"model": model, "worker": address})
        frames = self._gateway.stream_generate(address, body)
        try:
            first = await anext(frames)
        except StopAsyncIteration:
            error = WorkerUnavailable(address, f"it ended the stream for {model!r} without a frame")
            self._directory.drop(address, error.reason)
            raise error from None
        except WorkerUnavailable as exc:
            raise self._lost(address, model, exc) from exc
        return self._relay(address, model, first, frames)

    async def _relay(
        self, address: str, model: str, first: Frame, frames: AsyncIterator[Frame]
    ) -> AsyncIterator[Frame]:
        try:
            yield first
            async for frame in frames:
                yield frame
        except WorkerUnavailable as exc:
            yield error_frame(self._lost(address, model, exc))
        finally:
            # The client may leave early: closing the worker's stream cancels its generation.
            close = getattr(frames, "aclose", None)
            if close is not None:
                await close()

    def _lost(self, address: str, model: str, exc: WorkerUnavailable) -> WorkerUnavailable:
        if not isinstance(exc, WorkerBusy):  # a busy worker is alive: keep it
            self._directory.drop(address, exc.reason)
        return WorkerUnavailable(address, f"serving {model!r}: {exc.reason}", exc.timed_out)

    def _no_worker_message(self, model: str) -> str:
        available = self._directory.model_names()
        offer = ", ".join(repr(n) for n in available) if available else "none"
        return f"no worker serves model {model!r} (models available: {offer})"
