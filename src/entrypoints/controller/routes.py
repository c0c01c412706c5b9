"""The controller protocol over HTTP (FastChat's endpoints and field names; TinyChat's subset).

JSON endpoints answer a malformed body with HTTP 400 and `{"text", "error_code"}`. The stream
proxy answers a request it cannot serve with one `\\0`-terminated error frame.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vilaserve.application.controller.proxy_stream import ProxyGenerateStream, error_frame
from vilaserve.application.controller.worker_directory import WorkerDirectory
from vilaserve.domain.controller.worker_registry import ModelKind
from vilaserve.domain.shared.controller_messages import requested_model
from vilaserve.domain.shared.errors import ErrorCode, ServingError
from vilaserve.entrypoints.shared.container_dependencies import provided
from vilaserve.entrypoints.shared.internal_access import bearer_token
from vilaserve.entrypoints.shared.openapi_bodies import (
    HEARTBEAT,
    MODEL_LOOKUP,
    REGISTRATION,
    ROUTED_GENERATION_REQUEST,
    json_body,
)
from vilaserve.entrypoints.shared.worker_protocol_http import (
    FRAME_MEDIA_TYPE,
    BodyRefused,
    encode_frame,
    encode_frames,
    http_status_of,
    prepend,
    read_json,
    refusal_headers,
    refusal_status,
)

router = APIRouter()


def _status_of(error: ServingError) -> int:
    return http_status_of(error, 400 if error.is_client_error else 503)


def _check_secret(request: Request) -> None:
    """Registration and heartbeats need the shared secret when the controller has one."""
    secret = request.app.state.container.settings().registration_secret
    if not secret:
        return
    token = bearer_token(request.headers.get("authorization", ""))
    if not token:
        raise RegistrationRefused(
            "this controller needs the registration secret: send 'Authorization: Bearer "
            "<secret>' (the worker's --registration-secret)",
            ErrorCode.INVALID_AUTH_KEY,
        )
    if not hmac.compare_digest(token.encode(), secret.encode()):
        raise RegistrationRefused("the registration secret is wrong", ErrorCode.INCORRECT_AUTH_KEY)


class RegistrationRefused(BodyRefused):
    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message, 401)
        self.code = code


async def _body(request: Request) -> Any:
    """JSON only (a web page on the host cannot post text/plain here), bounded in size."""
    settings = request.app.state.container.settings()
    return await read_json(
        request,
        settings.max_request_bytes,
        json_only=True,
        text_limit=settings.max_text_request_bytes,
    )


def _error_response(error: ServingError) -> JSONResponse:
    return JSONResponse(error_frame(error), _status_of(error))


@router.post("/register_worker", openapi_extra=json_body(REGISTRATION))
async def register_worker(
    request: Request, directory: WorkerDirectory = provided("directory")
) -> Response:
    try:
        _check_secret(request)
        await directory.register(await _body(request))
    except ServingError as error:
        return _error_response(error)
    return JSONResponse(None)


@router.post("/receive_heart_beat", openapi_extra=json_body(HEARTBEAT))
async def receive_heart_beat(
    request: Request, directory: WorkerDirectory = provided("directory")
) -> Response:
    try:
        _check_secret(request)
        exist = directory.heartbeat(await _body(request))
    except ServingError as error:
        return _error_response(error)
    return JSONResponse({"exist": exist})


@router.post("/refresh_all_workers")
async def refresh_all_workers(
    directory: WorkerDirectory = provided("directory"),
) -> None:
    await directory.refresh_all()


@router.post("/list_models")
async def list_models(
    directory: WorkerDirectory = provided("directory"),
) -> dict[str, list[str]]:
    return {"models": directory.model_names(ModelKind.ALL)}


@router.post("/list_multimodal_models")
async def list_multimodal_models(
    directory: WorkerDirectory = provided("directory"),
) -> dict[str, list[str]]:
    return {"models": directory.model_names(ModelKind.MULTIMODAL)}


@router.post("/list_language_models")
async def list_language_models(
    directory: WorkerDirectory = provided("directory"),
) -> dict[str, list[str]]:
    return {"models": directory.model_names(ModelKind.LANGUAGE)}


@router.post("/get_worker_address", openapi_extra=json_body(MODEL_LOOKUP))
async def get_worker_address(
    request: Request, directory: WorkerDirectory = provided("directory")
) -> Response:
    try:
        model = requested_model(await _body(request))
    except ServingError as error:
        return _error_response(error)
    # FastChat's convention: an empty address means "no worker serves this model".
    return JSONResponse({"address": directory.worker_address(model) or ""})


@router.post("/worker_get_status")
async def worker_get_status(
    directory: WorkerDirectory = provided("directory"),
) -> dict[str, Any]:
    return directory.aggregate_status().to_dict()


@router.post("/worker_generate_stream", openapi_extra=json_body(ROUTED_GENERATION_REQUEST))
async def worker_generate_stream(
    request: Request, proxy: ProxyGenerateStream = provided("proxy_stream")
) -> Response:
    try:
        frames = await proxy.open(await _body(request))
    except ServingError as error:
        return Response(
            encode_frame(error_frame(error)), _status_of(error), media_type=FRAME_MEDIA_TYPE
        )
    # The worker's refusal before its first token keeps its status (it is not a 200 stream).
    first = await anext(frames)
    code = int(first.get("error_code") or 0)
    if code:
        await frames.aclose()  # type: ignore[attr-defined]
        status = refusal_status(code, 503)
        return Response(encode_frame(first), status, refusal_headers(code), FRAME_MEDIA_TYPE)
    return StreamingResponse(encode_frames(prepend(first, frames)), media_type=FRAME_MEDIA_TYPE)


@router.get("/test_connection")
async def test_connection() -> str:
    return "success"
