"""Builds the worker's FastAPI app from a container; starts and stops the heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from vilaserve.domain.shared.errors import ShuttingDown
from vilaserve.entrypoints.shared.internal_access import guard_internal_service
from vilaserve.entrypoints.shared.memory_release import ReleaseMemoryAfterLargeBodies
from vilaserve.entrypoints.worker import routes as worker_routes
from vilaserve.entrypoints.worker.container import WorkerContainer

log = logging.getLogger(__name__)


def create_worker_app(container: WorkerContainer) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load the model off the event loop (it takes seconds to minutes) before serving.
        await asyncio.to_thread(container.generate_stream)
        await asyncio.to_thread(container.describe_model)
        heartbeat_task = None
        if container.settings().register_with_controller:
            heartbeat_task = asyncio.create_task(container.heartbeat().run(), name="heartbeat")

        async def drain() -> None:
            """SIGTERM: the server stops accepting; the controller forgets us now; what runs
            gets `--drain-timeout-s` to finish, then ends with an error chunk."""
            timeout = container.settings().drain_timeout_s
            log.info("draining", extra={"timeout_s": timeout})
            if heartbeat_task is not None:
                heartbeat_task.cancel()
                await container.heartbeat().leave()
            await asyncio.sleep(timeout)
            reason = f"the worker is shutting down; its drain time ({timeout:g} s) ran out"
            await container.text_generator().stop_all(ShuttingDown(reason))

        app.state.drain = drain
        log.info(
            "worker ready",
            extra={"model": container.model_name(), "address": container.settings().host},
        )
        try:
            yield
        finally:
            if heartbeat_task is not None:
                heartbeat_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat_task

    app = FastAPI(title="vilaserve model worker", lifespan=lifespan)
    app.add_middleware(ReleaseMemoryAfterLargeBodies)
    settings = container.settings()
    guard_internal_service(
        app,
        settings.internal_token,
        open_paths=("/health",),
        bind_host=settings.host,
        advertised=(settings.advertised_address,),
        extra_hosts=settings.allowed_hosts,
    )
    app.state.container = container
    app.include_router(worker_routes.router)
    return app
