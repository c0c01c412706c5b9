"""The worker protocol over HTTP (TinyChat / LLaVA / FastChat), thin over the use cases.

Generation streams are `json + b"\\0"` frames with cumulative `text`. A request refused before
generation starts gets HTTP 400 with one such frame, so clients that only parse frames and
clients that check the status both see the error code and the message.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from dependency_injector.wiring import Provide, inject
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vilaserve.application.worker.generate_stream import GenerateStream, error_chunk
from vilaserve.application.worker.report_status import DescribeModel, ReportStatus
from vilaserve.domain.shared.errors import ServingError
from vilaserve.domain.shared.generation import StreamChunk
from vilaserve.entrypoints.shared.worker_protocol_http import (
    FRAME_MEDIA_TYPE,
    encode_frame,
    read_json,
)

router = APIRouter()
log = logging.getLogger(__name__)


def _refused(error: ServingError) -> int:
    """Logs a request refused before generation; returns its HTTP status."""
    log.info("request refused", extra={"error_code": int(error.code), "reason": error.message})
    return 400 if error.is_client_error else 500


async def _frames(chunks: AsyncIterator[StreamChunk]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield encode_frame(chunk.to_dict())


@router.post("/worker_generate_stream")
@inject
async def worker_generate_stream(
    request: Request,
    generate: GenerateStream = Depends(Provide["generate_stream"]),
) -> Response:
    try:
        prepared = generate.prepare(await read_json(request))
    except ServingError as error:
        return Response(
            encode_frame(error_chunk(error).to_dict()), _refused(error), media_type=FRAME_MEDIA_TYPE
        )
    return StreamingResponse(_frames(generate.stream(prepared)), media_type=FRAME_MEDIA_TYPE)


@router.post("/worker_generate")
@inject
async def worker_generate(
    request: Request,
    generate: GenerateStream = Depends(Provide["generate_stream"]),
) -> JSONResponse:
    try:
        prepared = generate.prepare(await read_json(request))
    except ServingError as error:
        return JSONResponse(error_chunk(error).to_dict(), _refused(error))
    last = StreamChunk(text="")
    async for last in generate.stream(prepared):  # noqa: B007 - only the final chunk matters
        pass
    status = 200 if last.error_code == 0 else (400 if last.error_code < 50000 else 500)
    return JSONResponse(last.to_dict(), status)


@router.post("/worker_get_status")
@inject
async def worker_get_status(
    report_status: ReportStatus = Depends(Provide["report_status"]),
) -> dict[str, object]:
    return report_status().to_dict()


@router.post("/count_token")
@inject
async def count_token(
    request: Request, describe: DescribeModel = Depends(Provide["describe_model"])
) -> JSONResponse:
    try:
        count = describe.count_tokens(await read_json(request))
    except ServingError as error:
        return JSONResponse({"count": 0, "error_code": int(error.code), "text": error.message}, 400)
    return JSONResponse({"count": count, "error_code": 0})


@router.post("/model_details")
@inject
async def model_details(
    describe: DescribeModel = Depends(Provide["describe_model"]),
) -> dict[str, object]:
    details = describe.details()
    reply: dict[str, object] = {
        "context_length": details.context_length,
        "tokens_per_image": details.tokens_per_image,
        "multimodal": details.multimodal,
    }
    if details.cpu_path is not None:
        reply["cpu_path"] = details.cpu_path
    return reply


@router.post("/worker_get_conv_template")
@inject
async def worker_get_conv_template(
    describe: DescribeModel = Depends(Provide["describe_model"]),
) -> dict[str, object]:
    return {"conv": describe.conversation_template().to_fastchat_dict()}


@router.get("/metrics")
@inject
async def metrics(observer: Any = Depends(Provide["engine_observer"])) -> Response:
    """Prometheus text format: the engine's load, caches and latencies (vLLM's names)."""
    return Response(observer.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
