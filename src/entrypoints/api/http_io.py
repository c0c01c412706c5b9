"""HTTP plumbing of the API server: bounded body reading, API keys, SSE, error responses."""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from vilaserve.application.api.completion_relay import Reply, ResponseStream
from vilaserve.domain.api.errors import ApiError, BadRequest, PayloadTooLarge, Unauthorized
from vilaserve.domain.shared.errors import ErrorCode
from vilaserve.entrypoints.shared.internal_access import bearer_token
from vilaserve.entrypoints.shared.worker_protocol_http import (
    BodyTooLarge,
    parse_json,
    read_bounded,
)


async def read_json_body(
    request: Request, limit: int, text_limit: int | None = None, picture_key: bytes | None = None
) -> Any:
    """The body as JSON, at most `limit` bytes; at most `text_limit` bytes when it names no
    picture (`picture_key` does not occur within its first `text_limit` bytes: checked on the
    bytes as they arrive, so a 20 MB prompt costs the API neither parsing nor rendering). 413
    beyond either."""
    try:
        scan = await read_bounded(request, limit, picture_key, text_limit=text_limit)
    except BodyTooLarge as exc:
        raise PayloadTooLarge(str(exc)) from exc
    try:
        return parse_json(scan)
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


def check_api_key(request: Request, keys: Sequence[str]) -> None:
    """OpenAI's `Authorization: Bearer <key>`; no keys configured means an open server."""
    if not keys:
        return
    token = bearer_token(request.headers.get("authorization", ""))
    if not token:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
    if not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys):
        raise Unauthorized("the API key is not valid", code=ErrorCode.INCORRECT_AUTH_KEY)


def error_response(error: ApiError) -> JSONResponse:
    headers = {}
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    elif error.status in (429, 503):
        headers["Retry-After"] = "1"
    return JSONResponse(error.to_dict(), error.status, headers=headers)


def _sse_event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


async def _sse(stream: ResponseStream) -> AsyncIterator[bytes]:
    async for chunk in stream:
        yield _sse_event(chunk)
    yield b"data: [DONE]\n\n"


class SseResponse(StreamingResponse):
    """Server-sent events that always close their `ResponseStream`, even when the client
    disconnects before the first byte (a never-started generator runs no `finally`)."""

    def __init__(self, stream: ResponseStream) -> None:
        super().__init__(
            _sse(stream),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            body = self.body_iterator
            close = getattr(body, "aclose", None)
            if close is not None:
                await close()
            await self._stream.aclose()


def reply_response(reply: Reply) -> JSONResponse | SseResponse:
    if reply.stream is not None:
        return SseResponse(reply.stream)
    return JSONResponse(reply.body)
