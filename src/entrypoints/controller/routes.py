"""The controller protocol over HTTP (FastChat's endpoints and field names; TinyChat's subset).

JSON endpoints answer a malformed body with HTTP 400 and `{"text", "error_code"}`. The stream
proxy answers a request it cannot serve with one `\\0`-terminated error frame.
"""

from __future__ import annotations

from typing import Any

from dependency_injector.wiring import Provide, inject
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vilaserve.application.controller.proxy_stream import ProxyGenerateStream, error_frame
from vilaserve.application.controller.worker_directory import WorkerDirectory
from vilaserve.domain.controller.worker_registry import ModelKind
from vilaserve.domain.shared.controller_messages import requested_model
from vilaserve.domain.shared.errors import ServingError
from vilaserve.entrypoints.shared.worker_protocol_http import (
    FRAME_MEDIA_TYPE,
    encode_frame,
    encode_frames,
    read_json,
)

router = APIRouter()


def _status_of(error: ServingError) -> int:
    return 400 if error.is_client_error else 503


def _error_response(error: ServingError) -> JSONResponse:
    return JSONResponse(error_frame(error), _status_of(error))


@router.post("/register_worker")
@inject
async def register_worker(
    request: Request, directory: WorkerDirectory = Depends(Provide["directory"])
) -> Response:
    try:
        await directory.register(await read_json(request))
    except ServingError as error:
        return _error_response(error)
    return JSONResponse(None)


@router.post("/receive_heart_beat")
@inject
async def receive_heart_beat(
    request: Request, directory: WorkerDirectory = Depends(Provide["directory"])
) -> Response:
    try:
        exist = directory.heartbeat(await read_json(request))
    except ServingError as error:
        return _error_response(error)
    return JSONResponse({"exist": exist})


@router.post("/refresh_all_workers")
@inject
async def refresh_all_workers(
    directory: WorkerDirectory = Depends(Provide["directory"]),
) -> None:
    await directory.refresh_all()


@router.post("/list_models")
@inject
async def list_models(
    directory: WorkerDirectory = Depends(Provide["directory"]),
) -> dict[str, list[str]]:
    return {"models": directory.model_names(ModelKind.ALL)}


@router.post("/list_multimodal_models")
@inject
async def list_multimodal_models(
    directory: WorkerDirectory = Depends(Provide["directory"]),
) -> dict[str, list[str]]:
    return {"models": directory.model_names(ModelKind.MULTIMODAL)}


@router.post("/list_language_models")
@inject
async def list_language_models(
    directory: WorkerDirectory = Depends(Provide["directory"]),
) -> dict[str, list[str]]:
    return {"models": directory.model_names(ModelKind.LANGUAGE)}


@router.post("/get_worker_address")
@inject
async def get_worker_address(
    request: Request, directory: WorkerDirectory = Depends(Provide["directory"])
) -> Response:
    try:
        model = requested_model(await read_json(request))
    except ServingError as error:
        return _error_response(error)
    # FastChat's convention: an empty address means "no worker serves this model".
    return JSONResponse({"address": directory.worker_address(model) or ""})


@router.post("/worker_get_status")
@inject
async def worker_get_status(
    directory: WorkerDirectory = Depends(Provide["directory"]),
) -> dict[str, Any]:
    return directory.aggregate_status().to_dict()


@router.post("/worker_generate_stream")
@inject
async def worker_generate_stream(
    request: Request, proxy: ProxyGenerateStream = Depends(Provide["proxy_stream"])
) -> Response:
    try:
        frames = await proxy.open(await read_json(request))
    except ServingError as error:
        return Response(
            encode_frame(error_frame(error)), _status_of(error), media_type=FRAME_MEDIA_TYPE
        )
    return StreamingResponse(encode_frames(frames), media_type=FRAME_MEDIA_TYPE)


@router.get("/test_connection")
async def test_connection() -> str:
    return "success"
