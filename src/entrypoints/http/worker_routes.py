"""The worker protocol over HTTP (TinyChat / LLaVA / FastChat), thin over the use cases.

Generation streams are `json + b"\\0"` frames with cumulative `text`. A request refused before
generation starts gets HTTP 400 with one such frame, so clients that only parse frames and
clients that check the status both see the error code and the message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from dependency_injector.wiring import Provide, inject
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vilaserve.application.generate_stream import GenerateStream, error_chunk
from vilaserve.application.report_status import DescribeModel, ReportStatus
from vilaserve.domain.errors import InvalidRequest, ServingError
from vilaserve.domain.generation import StreamChunk

router = APIRouter()
log = logging.getLogger(__name__)

FRAME_MEDIA_TYPE = "application/octet-stream"


def frame(chunk: StreamChunk) -> bytes:
    return json.dumps(chunk.to_dict(), ensure_ascii=False).encode() + b"\0"


async def read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise InvalidRequest("the request body is empty; a JSON object is expected")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON ({exc})") from exc


def _refused(error: ServingError) -> int:
    """Logs a request refused before generation; returns its HTTP status."""
    log.info("request refused", extra={"error_code": int(error.code), "reason": error.message})
    return 400 if error.is_client_error else 500


async def _frames(chunks: AsyncIterator[StreamChunk]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield frame(chunk)


@router.post("/worker_generate_stream")
@inject
async def worker_generate_stream(
    request: Request,
    generate: GenerateStream = Depends(Provide["generate_stream"]),
) -> Response:
    try:
        prepared = generate.prepare(await read_json(request))
    except ServingError as error:
        return Response(frame(error_chunk(error)), _refused(error), media_type=FRAME_MEDIA_TYPE)
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
    return {
        "context_length": details.context_length,
        "tokens_per_image": details.tokens_per_image,
        "multimodal": details.multimodal,
    }


@router.post("/worker_get_conv_template")
@inject
async def worker_get_conv_template(
    describe: DescribeModel = Depends(Provide["describe_model"]),
) -> dict[str, object]:
    return {"conv": describe.conversation_template().to_fastchat_dict()}


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
