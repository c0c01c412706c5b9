"""The worker protocol over HTTP (TinyChat / LLaVA / FastChat), thin over the use cases.

Generation streams are `json + b"\\0"` frames with cumulative `text`. A request refused before
generation starts gets HTTP 400 with one such frame, so clients that only parse frames and
clients that check the status both see the error code and the message.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vilaserve.application.worker.describe_model import DescribeModel
from vilaserve.application.worker.generate_stream import (
    GenerateStream,
    PreparedRequest,
    error_chunk,
)
from vilaserve.application.worker.report_status import ReportStatus
from vilaserve.domain.shared.errors import ServingError
from vilaserve.domain.shared.generation import StreamChunk
from vilaserve.entrypoints.shared.container_dependencies import provided
from vilaserve.entrypoints.shared.openapi_bodies import (
    COUNT_TOKEN_REQUEST,
    GENERATION_REQUEST,
    json_body,
)
from vilaserve.entrypoints.shared.worker_protocol_http import (
    FRAME_MEDIA_TYPE,
    ClientGone,
    FrameEncoder,
    encode_frame,
    http_status_of,
    prepend,
    read_json,
    refusal_headers,
    refusal_status,
    unless_disconnected,
)
from vilaserve.entrypoints.worker.settings import WorkerSettings

router = APIRouter()
log = logging.getLogger(__name__)


async def _body(request: Request, settings: WorkerSettings) -> Any:
    """JSON only (a web page on the host cannot post text/plain here), bounded in size."""
    return await read_json(
        request,
        settings.max_request_bytes,
        json_only=True,
        text_limit=settings.max_text_request_bytes,
    )


async def _prepare(
    request: Request, generate: GenerateStream, settings: WorkerSettings
) -> PreparedRequest:
    """The checked generation request; a refusal is logged and raised as `ServingError`."""
    try:
        return generate.prepare(await _body(request, settings))
    except ServingError as error:
        log.info("request refused", extra={"error_code": int(error.code), "reason": error.message})
        raise


def _refusal_status(error: ServingError) -> int:
    return http_status_of(error, refusal_status(int(error.code), 500))


async def _frames(chunks: AsyncIterator[StreamChunk]) -> AsyncIterator[bytes]:
    encoder = FrameEncoder()  # one request's frames: the text already sent is not escaped again
    async for chunk in chunks:
        yield encoder.encode(chunk.to_dict())


@router.post("/worker_generate_stream", openapi_extra=json_body(GENERATION_REQUEST))
async def worker_generate_stream(
    request: Request,
    generate: GenerateStream = provided("generate_stream"),
    settings: WorkerSettings = provided("settings"),
) -> Response:
    try:
        prepared = await _prepare(request, generate, settings)
    except ServingError as error:
        frame = encode_frame(error_chunk(error).to_dict())
        headers = refusal_headers(int(error.code))
        return Response(frame, _refusal_status(error), headers, media_type=FRAME_MEDIA_TYPE)
    chunks = generate.stream(prepared)
    # Headers wait for the first chunk, so that whatever is refused before the first token
    # (a picture that does not decode, a prompt longer than the context, a full queue) gets
    # its 4xx status rather than a 200 with an error frame.
    try:
        first = await unless_disconnected(request, anext(chunks))
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; the generation is cancelled
    if first.error_code:
        await chunks.aclose()  # type: ignore[attr-defined]
        status = refusal_status(first.error_code, 500)
        return Response(
            encode_frame(first.to_dict()),
            status,
            refusal_headers(first.error_code),
            FRAME_MEDIA_TYPE,
        )
    return StreamingResponse(_frames(prepend(first, chunks)), media_type=FRAME_MEDIA_TYPE)


@router.post("/worker_generate", openapi_extra=json_body(GENERATION_REQUEST))
async def worker_generate(
    request: Request,
    generate: GenerateStream = provided("generate_stream"),
    settings: WorkerSettings = provided("settings"),
) -> Response:
    try:
        prepared = await _prepare(request, generate, settings)
    except ServingError as error:
        headers = refusal_headers(int(error.code))
        return JSONResponse(error_chunk(error).to_dict(), _refusal_status(error), headers)

    async def last_chunk() -> StreamChunk:
        last = StreamChunk(text="")
        async for last in generate.stream(prepared):  # noqa: B007 - only the final chunk counts
            pass
        return last

    try:
        # A client that gives up is not waited for: its generation stops within a step.
        last = await unless_disconnected(request, last_chunk())
    except ClientGone:
        return Response(status_code=499)
    status = 200 if last.error_code == 0 else refusal_status(last.error_code, 500)
    return JSONResponse(last.to_dict(), status, refusal_headers(last.error_code))


@router.post("/worker_get_status")
async def worker_get_status(
    report_status: ReportStatus = provided("report_status"),
) -> dict[str, object]:
    return report_status().to_dict()


@router.post("/count_token", openapi_extra=json_body(COUNT_TOKEN_REQUEST))
async def count_token(
    request: Request,
    describe: DescribeModel = provided("describe_model"),
    settings: WorkerSettings = provided("settings"),
) -> JSONResponse:
    try:
        count = await describe.count_tokens(await _body(request, settings))
    except ServingError as error:
        reply = {"count": 0, "error_code": int(error.code), "text": error.message}
        return JSONResponse(reply, http_status_of(error, 400))
    return JSONResponse({"count": count, "error_code": 0})


@router.post("/model_details")
async def model_details(
    describe: DescribeModel = provided("describe_model"),
) -> dict[str, object]:
    return describe.details().to_dict()


@router.post("/worker_get_conv_template")
async def worker_get_conv_template(
    describe: DescribeModel = provided("describe_model"),
) -> dict[str, object]:
    return {"conv": describe.conversation_template().to_fastchat_dict()}


@router.get("/metrics")
async def metrics(observer: Any = provided("engine_observer")) -> Response:
    """Prometheus text format: the engine's load, caches and latencies (vLLM's names)."""
    return Response(observer.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
