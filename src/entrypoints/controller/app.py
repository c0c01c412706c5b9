"""Builds the controller's FastAPI app from a container; runs the heartbeat-expiry sweep."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from vilaserve.application.controller.worker_directory import WorkerDirectory
from vilaserve.entrypoints.controller import routes as controller_routes
from vilaserve.entrypoints.controller.container import ControllerContainer
from vilaserve.entrypoints.shared.internal_access import guard_internal_service
from vilaserve.entrypoints.shared.memory_release import ReleaseMemoryAfterLargeBodies

log = logging.getLogger(__name__)


async def _sweep_expired(directory: WorkerDirectory, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        directory.expire()


def create_controller_app(container: ControllerContainer) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings = container.settings()
        sweeper = asyncio.create_task(
            _sweep_expired(container.directory(), settings.expiry_check_interval_s),
            name="expire-workers",
        )
        log.info(
            "controller ready",
            extra={
                "dispatch_method": settings.dispatch_method,
                "heart_beat_expiration_s": settings.heart_beat_expiration,
            },
        )
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await container.worker_gateway().aclose()

    app = FastAPI(title="vilaserve controller", lifespan=lifespan)
    app.add_middleware(ReleaseMemoryAfterLargeBodies)
    settings = container.settings()
    guard_internal_service(
        app,
        settings.internal_token,
        # Workers show the registration secret on these two instead; /test_connection is a ping.
        open_paths=("/register_worker", "/receive_heart_beat", "/test_connection"),
        bind_host=settings.host,
        advertised=(),
        extra_hosts=settings.allowed_hosts,
    )
    app.state.container = container
    app.include_router(controller_routes.router)
    return app
