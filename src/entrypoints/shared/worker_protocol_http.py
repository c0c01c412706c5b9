"""The worker protocol's HTTP pieces, shared by the worker's and the controller's routes.

Both services read JSON request bodies the same way (an empty or malformed body is an
`InvalidRequest` naming the problem) and write generation streams the same way: one JSON object
per frame, each followed by `b"\\0"` (FastChat / LLaVA / TinyChat framing).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import Request

from vilaserve.domain.shared.errors import InvalidRequest

FRAME_MEDIA_TYPE = "application/octet-stream"
FRAME_SEPARATOR = b"\0"


def encode_frame(frame: Mapping[str, Any]) -> bytes:
    return json.dumps(frame, ensure_ascii=False).encode() + FRAME_SEPARATOR


async def encode_frames(frames: AsyncIterator[Mapping[str, Any]]) -> AsyncIterator[bytes]:
    async for frame in frames:
        yield encode_frame(frame)


async def read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise InvalidRequest("the request body is empty; a JSON object is expected")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON ({exc})") from exc
