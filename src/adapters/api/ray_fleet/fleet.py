"""The model directory and the worker gateway when the workers are Ray Serve replicas.

The fleet is one Ray Serve deployment, reached through one deployment handle; Ray Serve picks a
replica for each call (request_router.py), checks their health and restarts them. So the
directory has one address for the fleet's model, and the gateway sends each call through the
handle named by that address. Streams come back as the worker's own frames (`json + b"\\0"`,
as /worker_generate_stream sends them) and are decoded as the HTTP client decodes them.

Nothing here imports Ray: the handle is duck-typed (`handle.<method>.remote(...)` gives an
awaitable, `handle.options(stream=True).<method>.remote(...)` an async iterator of frames, both
with `cancel()`), so the unit tests drive these adapters with fakes. Whatever Ray raises (an
actor that died, a node that left, a call that was cancelled) is a `WorkerUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

from vilaserve.adapters.api.ray_fleet.affinity import affinity_key
from vilaserve.adapters.shared.worker_client import (
    DEFAULT_CONTEXT_LENGTH,
    encode_payload,
    split_frames,
)
from vilaserve.domain.api.ports import ModelDirectory
from vilaserve.domain.shared.controller_messages import parse_worker_status
from vilaserve.domain.shared.errors import InvalidRequest, WorkerBusy, WorkerUnavailable
from vilaserve.domain.shared.worker_gateway import ModelDetails, WorkerGateway
from vilaserve.domain.shared.worker_status import WorkerStatus

ADDRESS_SCHEME = "ray-serve://"
# The keyword the replica's `generate_stream` takes the conversation's key under; the request
# router reads it from the pending call (request_router.py).
AFFINITY_KWARG = "affinity_key"


def fleet_address(app_name: str, deployment_name: str) -> str:
    """How the fleet is named where a worker address is expected (logs, the router's cache)."""
    return f"{ADDRESS_SCHEME}{app_name}/{deployment_name}"


@dataclass(frozen=True)
class RayFleet:
    """A Ray Serve deployment of model workers, all serving `model_names`."""

    handle: Any  # ray.serve.handle.DeploymentHandle
    address: str
    model_names: tuple[str, ...]
    cache_aware: bool = True  # send each conversation's key with its calls


class RayModelDirectory(ModelDirectory):
    """Every model of the fleet is served at the fleet's address: which replica takes a request
    is Ray Serve's choice, made per call."""

    def __init__(self, fleet: RayFleet) -> None:
        self._fleet = fleet

    async def list_models(self) -> list[str]:
        return list(self._fleet.model_names)

    async def worker_address(self, model: str) -> str | None:
        return self._fleet.address if model in self._fleet.model_names else None

    async def refresh_workers(self) -> None:
        """Nothing to ask: Ray Serve drops a dead replica from its routing as it notices the
        actor's death, and the failed-over call is routed anew."""


def _is_backpressure(exc: BaseException) -> bool:
    # ray.serve.exceptions.BackPressureError, named rather than imported (no Ray here): the
    # deployment's queue (max_queued_requests) is full; the replicas are alive.
    return type(exc).__name__ == "BackPressureError"


def _unavailable(address: str, what: str, exc: BaseException) -> WorkerUnavailable:
    if _is_backpressure(exc):
        return WorkerBusy(address, f"{what}: the replicas' queue is full; retry shortly")
    timed_out = isinstance(exc, TimeoutError)
    cause = "timed out" if timed_out else f"{type(exc).__name__}: {exc}"
    return WorkerUnavailable(address, f"{what}: {cause}", timed_out)


def _cancel(response: Any) -> None:
    with contextlib.suppress(Exception):  # already finished, or its replica is gone
        response.cancel()


class RayWorkerGateway(WorkerGateway):
    def __init__(self, fleet: RayFleet, timeout_s: float = 100.0, status_timeout_s: float = 5.0):
        """`timeout_s`: the longest silence tolerated from a replica, as the HTTP client's read
        timeout (waiting for a free replica included)."""
        self._fleet = fleet
        self._timeout_s = timeout_s
        self._status_timeout_s = status_timeout_s

    def _handle(self, worker_address: str) -> Any:
        if worker_address != self._fleet.address:
            raise WorkerUnavailable(
                worker_address, f"not this fleet's address ({self._fleet.address})"
            )
        return self._fleet.handle

    async def _call(self, worker_address: str, method: str, timeout_s: float) -> Any:
        response = getattr(self._handle(worker_address), method).remote()
        try:
            return await asyncio.wait_for(_awaited(response), timeout_s)
        except asyncio.CancelledError:
            _cancel(response)
            raise
        except Exception as exc:
            _cancel(response)
            raise _unavailable(worker_address, method, exc) from exc

    async def get_status(self, worker_address: str, timeout_s: float = 5.0) -> WorkerStatus:
        """The status of whichever replica Ray Serve picks."""
        reply = await self._call(worker_address, "get_status", timeout_s)
        try:
            return parse_worker_status(reply)
        except InvalidRequest as exc:
            raise WorkerUnavailable(
                worker_address, f"get_status answered {repr(reply)[:200]}: {exc.message}"
            ) from exc

    async def model_details(self, worker_address: str, model: str) -> ModelDetails:
        reply = await self._call(worker_address, "model_details", self._timeout_s)
        if not isinstance(reply, dict):
            raise WorkerUnavailable(worker_address, "model_details sent no model details")
        return ModelDetails(
            context_length=int(reply.get("context_length") or DEFAULT_CONTEXT_LENGTH),
            multimodal=bool(reply.get("multimodal", True)),
            tokens_per_image=int(reply.get("tokens_per_image") or 0),
        )

    async def conversation_template(self, worker_address: str, model: str) -> dict[str, Any]:
        reply = await self._call(worker_address, "conversation_template", self._timeout_s)
        conv = reply.get("conv") if isinstance(reply, dict) else None
        if not isinstance(conv, dict):
            raise WorkerUnavailable(worker_address, "conversation_template sent no template")
        return conv

    async def stream_generate(
        self, worker_address: str, payload: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        """The replica's frames as they come. Closing this iterator early (a client that went
        away) cancels the call, and with it the generation on the replica."""
        handle = self._handle(worker_address)
        # Encoded here, as the HTTP client does: a payload that is not JSON is the caller's
        # error, and the replica reads exactly the bytes a worker's HTTP route would.
        body = encode_payload(payload)
        key = affinity_key(payload) if self._fleet.cache_aware else None
        response = handle.options(stream=True).generate_stream.remote(body, **{AFFINITY_KWARG: key})
        try:
            async for frame in split_frames(self._pieces(response)):
                yield frame
        except Exception as exc:  # the replica died, its node left, a frame was not JSON
            raise _unavailable(worker_address, "generation", exc) from exc
        finally:
            _cancel(response)

    async def _pieces(self, response: Any) -> AsyncIterator[bytes]:
        pieces = response.__aiter__()
        while True:
            try:
                piece = await asyncio.wait_for(pieces.__anext__(), self._timeout_s)
            except StopAsyncIteration:
                return
            yield piece


async def _awaited(response: Awaitable[Any]) -> Any:
    return await response
