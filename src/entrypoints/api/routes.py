"""The OpenAI-compatible routes, the health and metrics endpoints, and the web chat page."""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from vilaserve.application.api.completion_relay import Reply
from vilaserve.application.api.metrics import ApiMetrics
from vilaserve.application.api.use_cases import ChatCompletion, Completion, ListModels
from vilaserve.domain.api.errors import ModelNotFound, NotFound
from vilaserve.domain.api.openai_requests import ChatCompletionRequest, CompletionRequest
from vilaserve.entrypoints.api.http_io import check_api_key, read_json_body, reply_response
from vilaserve.entrypoints.api.settings import ApiSettings
from vilaserve.entrypoints.shared.container_dependencies import provided
from vilaserve.entrypoints.shared.openapi_bodies import inline_refs, json_body
from vilaserve.entrypoints.shared.worker_protocol_http import ClientGone, unless_disconnected

STATIC_DIR = Path(__file__).resolve().parent / "static"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

router = APIRouter()
# The bodies are read and validated by the use cases (OpenAI-shaped errors); declared here for
# the OpenAPI schema only.
CHAT_BODY = json_body(inline_refs(ChatCompletionRequest.model_json_schema()))
COMPLETION_BODY = json_body(inline_refs(CompletionRequest.model_json_schema()))


async def _answer(request: Request, work: Awaitable[Reply]) -> Response:
    """The reply. A client that hangs up before it is ready (a whole answer, or a stream's
    first chunks) is not waited for: its generation stops, nobody reads the 499."""
    try:
        reply = await unless_disconnected(request, work)
    except ClientGone:
        return Response(status_code=499)
    return reply_response(reply)


async def require_api_key(request: Request, settings: ApiSettings = provided("settings")) -> None:
    check_api_key(request, settings.api_key_list)


@router.post(
    "/v1/chat/completions", dependencies=[Depends(require_api_key)], openapi_extra=CHAT_BODY
)
async def chat_completions(
    request: Request,
    chat: ChatCompletion = provided("chat_completion"),
    settings: ApiSettings = provided("settings"),
) -> Response:
    body = await read_json_body(
        request, settings.max_request_bytes, settings.max_text_request_bytes, b'"image_url"'
    )
    return await _answer(request, chat(body))


@router.post(
    "/v1/completions", dependencies=[Depends(require_api_key)], openapi_extra=COMPLETION_BODY
)
async def completions(
    request: Request,
    completion: Completion = provided("completion"),
    settings: ApiSettings = provided("settings"),
) -> Response:
    body = await read_json_body(
        request, settings.max_request_bytes, settings.max_text_request_bytes
    )
    return await _answer(request, completion(body))


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def models(list_models: ListModels = provided("list_models")) -> dict[str, Any]:
    return await list_models()


@router.get("/v1/models/{model:path}", dependencies=[Depends(require_api_key)])
async def model(model: str, list_models: ListModels = provided("list_models")) -> dict[str, Any]:
    card = await list_models.model(model)
    if card is None:
        raise ModelNotFound(f"the model '{model}' does not exist", param="model")
    return card


@router.get("/health")
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(
    request: Request,
    metrics: ApiMetrics = provided("metrics"),
    settings: ApiSettings = provided("settings"),
) -> PlainTextResponse:
    if not settings.public_metrics:
        check_api_key(request, settings.api_key_list)
    return PlainTextResponse(metrics.render(), media_type=PROMETHEUS_TEXT)


@router.get("/", include_in_schema=False)
async def chat_page(settings: ApiSettings = provided("settings")) -> Response:
    if not settings.web_chat:
        raise NotFound("the web chat is turned off on this server (--no-web-chat)")
    return FileResponse(STATIC_DIR / "chat.html", media_type="text/html")
