"""The controller's use cases about workers: who they are, whether they live, where to send a
request. Everything that waits on a worker is an `await` with a short timeout, so a slow or dead
worker never holds up the others.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from vilaserve.domain.controller.worker_registry import DispatchMethod, ModelKind, WorkerRegistry
from vilaserve.domain.shared.controller_messages import parse_heartbeat, parse_registration
from vilaserve.domain.shared.errors import WorkerBusy, WorkerUnavailable
from vilaserve.domain.shared.worker_gateway import WorkerGateway
from vilaserve.domain.shared.worker_status import WorkerStatus

log = logging.getLogger(__name__)


class WorkerDirectory:
    def __init__(
        self,
        registry: WorkerRegistry,
        gateway: WorkerGateway,
        dispatch_method: DispatchMethod,
        status_timeout_s: float = 5.0,
    ) -> None:
        self._registry = registry
        self._gateway = gateway
        self._method = dispatch_method
        self._status_timeout_s = status_timeout_s

    async def register(self, body: Any) -> None:
        """`/register_worker`. Without `worker_status` the worker is asked for it (FastChat).

        An address already registered (under any spelling: `localhost`, `127.1`, ...) is
        re-registered with what the worker itself reports, never with the body's claims:
        whoever can post here cannot re-bind a live worker to other models (or make its model
        vanish). A live worker also keeps where it is reached, `multimodal` and
        `check_heart_beat` (see `WorkerRegistry.register`)."""
        registration = parse_registration(body)
        live_at = self._registry.live_address(registration.worker_name)
        status = registration.worker_status
        if status is None or self._registry.is_registered(registration.worker_name):
            # A live worker is asked where it is reached: the one answer that counts is its own.
            status = await self._reported_status(live_at or registration.worker_name)
        record = self._registry.register(
            registration.worker_name,
            status,
            multimodal=registration.multimodal,
            check_heart_beat=registration.check_heart_beat,
        )
        log.info(
            "worker registered" if live_at is None else "live worker registered again",
            extra={
                "worker": record.address,
                "registered_as": registration.worker_name,
                "models": list(record.model_names),
                "multimodal": record.multimodal,
                "check_heart_beat": record.check_heart_beat,
            },
        )

    async def _reported_status(self, address: str) -> WorkerStatus:
        try:
            return await self._gateway.get_status(address, self._status_timeout_s)
        except WorkerUnavailable as exc:
            raise WorkerUnavailable(
                address,
                f"cannot register it: it did not report its status ({exc.reason})",
                exc.timed_out,
            ) from exc

    def heartbeat(self, body: Any) -> bool:
        """`/receive_heart_beat`: the reply's `exist`; False asks the worker to register again."""
        report = parse_heartbeat(body)
        if report.leaving:  # a worker shutting down: no new requests go to it from now on
            self.drop(report.worker_name, "it is shutting down")
            return False
        exist = self._registry.heartbeat(report.worker_name, report.queue_length)
        if not exist:
            log.info("heartbeat from an unknown worker", extra={"worker": report.worker_name})
        return exist

    async def refresh_all(self) -> None:
        """`/refresh_all_workers`: ask every worker for its status; drop those that fail."""
        addresses = self._registry.addresses()
        replies = await asyncio.gather(
            *(self._gateway.get_status(a, self._status_timeout_s) for a in addresses),
            return_exceptions=True,
        )
        for address, reply in zip(addresses, replies, strict=True):
            if isinstance(reply, WorkerStatus):
                self._registry.update_status(address, reply)
            elif isinstance(reply, WorkerBusy):
                log.info("worker busy, kept", extra={"worker": address, "reason": reply.reason})
            elif isinstance(reply, WorkerUnavailable):
                self.drop(address, reply.reason)
            else:
                raise reply  # a bug, not a worker failure: let it surface

    def drop(self, address: str, reason: str) -> None:
        if self._registry.remove(address):
            log.warning("worker dropped", extra={"worker": address, "reason": reason})

    def expire(self) -> None:
        for record in self._registry.expire():
            log.warning(
                "worker expired: no heartbeat in time",
                extra={
                    "worker": record.address,
                    "models": list(record.model_names),
                    "expiration_s": self._registry.expiration_s,
                },
            )

    def model_names(self, kind: ModelKind = ModelKind.ALL) -> list[str]:
        return self._registry.model_names(kind)

    def worker_address(self, model: str) -> str | None:
        """The worker for the next request to `model` (the dispatch method decides)."""
        return self._registry.pick(model, self._method)

    def aggregate_status(self) -> WorkerStatus:
        return self._registry.aggregate_status()
