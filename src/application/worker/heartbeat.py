"""Keeping the worker known to its controller: registration and periodic heartbeats.

Runs as an asyncio task: every wait is an `await`, so the event loop stays free, and a
controller that is down only delays heartbeats, never a request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from vilaserve.application.worker.report_status import ReportStatus
from vilaserve.domain.shared.errors import ControllerUnavailable
from vilaserve.domain.worker.ports import ControllerClient

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class HeartbeatPolicy:
    """TinyChat beats every 15 s (controller expiry 30 s); FastChat 45 s (expiry 90 s)."""

    interval_s: float = 15.0
    retry_min_s: float = 1.0
    retry_max_s: float = 30.0


class Register:
    """Announce this worker, its models and whether it takes images."""

    def __init__(
        self,
        controller: ControllerClient,
        worker_address: str,
        report_status: ReportStatus,
        multimodal: bool,
    ) -> None:
        self._controller = controller
        self._address = worker_address
        self._report_status = report_status
        self._multimodal = multimodal

    async def __call__(self) -> None:
        await self._controller.register(self._address, self._report_status(), self._multimodal)
        log.info("registered with the controller", extra={"worker_address": self._address})


class Heartbeat:
    def __init__(
        self,
        controller: ControllerClient,
        register: Register,
        report_status: ReportStatus,
        worker_address: str,
        policy: HeartbeatPolicy,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._controller = controller
        self._register = register
        self._report_status = report_status
        self._address = worker_address
        self._policy = policy
        self._sleep = sleep

    async def run(self) -> None:
        """Register, then beat forever; cancel the task to stop."""
        await self._retrying(self._register, "registration")
        while True:
            await self._sleep(self._policy.interval_s)
            await self._retrying(self.beat_once, "heartbeat")

    async def beat_once(self) -> None:
        """One heartbeat; re-registers when the controller has forgotten this worker."""
        exist = await self._controller.heartbeat(self._address, self._report_status().queue_length)
        if not exist:
            log.warning("the controller does not know this worker; registering again")
            await self._register()

    async def leave(self) -> None:
        """Once, without retrying: a controller that cannot be told expires us anyway."""
        try:
            await self._controller.leave(self._address)
            log.info("told the controller this worker is leaving")
        except ControllerUnavailable as exc:
            log.warning("could not tell the controller we are leaving", extra={"reason": str(exc)})

    async def _retrying(self, action: Callable[[], Awaitable[None]], what: str) -> None:
        """Repeat `action` with exponential back-off while the controller is unreachable."""
        delay = self._policy.retry_min_s
        while True:
            try:
                await action()
                return
            except ControllerUnavailable as exc:
                log.warning(
                    "controller unreachable; retrying",
                    extra={"action": what, "retry_in_s": delay, "reason": str(exc)},
                )
                await self._sleep(delay)
                delay = min(delay * 2, self._policy.retry_max_s)
