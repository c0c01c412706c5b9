"""Builds the API server's FastAPI app: routes, the web chat's static files, error shapes."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from vilaserve.domain.api.errors import (
    ApiError,
    BadRequest,
    ModelNotFound,
    UpstreamFailure,
    as_api_error,
)
from vilaserve.domain.shared.errors import Unavailable
from vilaserve.entrypoints.api import routes as api_routes
from vilaserve.entrypoints.api.container import ApiContainer
from vilaserve.entrypoints.api.http_io import error_response
from vilaserve.entrypoints.shared.memory_release import ReleaseMemoryAfterLargeBodies

log = logging.getLogger(__name__)


async def _close(clients: list[object]) -> None:
    for client in clients:
        close = getattr(client, "aclose", None)  # fakes in tests have none
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


def create_api_app(container: ApiContainer) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings = container.settings()
        # Built here (no I/O yet) so that shutdown closes exactly the pools that exist.
        clients = [
            container.worker_gateway(),
            container.model_directory(),
            container.image_fetcher(),
        ]
        log.info(
            "api ready",
            extra={
                "controller": settings.controller_address,
                "api_keys": len(settings.api_key_list),
                "remote_images": settings.allow_remote_images,
            },
        )
        try:
            yield
        finally:
            await _close(clients)

    app = FastAPI(title="vilaserve OpenAI-compatible API", lifespan=lifespan)
    app.add_middleware(ReleaseMemoryAfterLargeBodies)
    app.state.container = container

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        log.log(
            logging.WARNING if error.status >= 500 else logging.INFO,
            "request refused",
            extra={
                "path": request.url.path,
                "status": error.status,
                "error_code": int(error.code),
                "reason": error.message,
            },
        )
        return error_response(error)

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, error: Unavailable) -> JSONResponse:
        return await api_error(request, as_api_error(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 404:
            return error_response(ModelNotFound(f"no such endpoint: {request.url.path}"))
        response = error_response(BadRequest(str(error.detail)))
        response.status_code = error.status_code
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return error_response(UpstreamFailure(f"internal error: {type(error).__name__}: {error}"))

    app.include_router(api_routes.router)
    app.mount("/static", StaticFiles(directory=api_routes.STATIC_DIR), name="static")
    return app
