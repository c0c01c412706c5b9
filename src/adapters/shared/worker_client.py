"""Talking to a model worker over its FastChat / TinyChat HTTP protocol.

The one client of the protocol, used by the controller (status polls, stream proxy) and the
OpenAI-compatible API (model details, template, generation). One pooled `httpx.AsyncClient` per
process; the stream is read frame by frame so a slow worker only ever blocks the request that
waits on it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from vilaserve.domain.shared.controller_messages import parse_worker_status
from vilaserve.domain.shared.errors import InvalidRequest, WorkerBusy, WorkerUnavailable
from vilaserve.domain.shared.worker_gateway import FRAME_SEPARATOR, ModelDetails, WorkerGateway
from vilaserve.domain.shared.worker_status import WorkerStatus

DEFAULT_CONTEXT_LENGTH = 2048  # FastChat's fallback when a worker has no /model_details
_JSON_HEADERS = {"content-type": "application/json"}


def _raise_if_busy(worker_address: str, response: httpx.Response) -> None:
    """A 503 with Retry-After is a worker turning connections away (its connection limit): it
    is alive, and must not be taken for dead."""
    if response.status_code == 503 and "retry-after" in response.headers:
        raise WorkerBusy(worker_address, "it is turning connections away (503); retry shortly")


def bearer(token: str | None) -> dict[str, str]:
    """The header that carries the stack's internal token, when there is one."""
    return {"authorization": f"Bearer {token}"} if token else {}


def encode_payload(payload: dict[str, Any]) -> bytes:
    """The request body, encoded before any connection is made: a payload that cannot be sent
    (text that is not valid Unicode, NaN) is the caller's error, never the worker's failure."""
    try:
        return json.dumps(payload, ensure_ascii=False, allow_nan=False).encode()
    except (ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidRequest(f"the request cannot be sent as JSON: {exc}") from exc


async def split_frames(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """Reassembles `json + b"\\0"` frames from arbitrary byte chunks and decodes each one."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(FRAME_SEPARATOR)
        for raw in complete:
            if raw.strip():
                yield json.loads(raw)
    if pending.strip():
        yield json.loads(pending)


class HttpWorkerClient(WorkerGateway):
    def __init__(
        self,
        timeout_s: float = 100.0,
        connect_timeout_s: float = 5.0,
        internal_token: str | None = None,
    ) -> None:
        """`internal_token`: sent on every request, for workers that require it."""
        self._client = httpx.AsyncClient(
            headers=bearer(internal_token),
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def post_json(
        self,
        worker_address: str,
        path: str,
        payload: dict[str, Any],
        timeout_s: float | None = None,
    ) -> Any:
        """POSTs `payload` and returns the decoded JSON reply (any HTTP status)."""
        url = worker_address.rstrip("/") + path
        timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else httpx.Timeout(timeout_s)
        content = encode_payload(payload)
        try:
            response = await self._client.post(
                url, content=content, headers=_JSON_HEADERS, timeout=timeout
            )
            _raise_if_busy(worker_address, response)
            return response.json()
        except httpx.TimeoutException as exc:
            raise WorkerUnavailable(worker_address, f"timed out on {path}", True) from exc
        except (httpx.HTTPError, ValueError) as exc:
            raise WorkerUnavailable(worker_address, f"{path}: {type(exc).__name__}: {exc}") from exc

    async def get_status(self, worker_address: str, timeout_s: float = 5.0) -> WorkerStatus:
        """`/worker_get_status`, with a short timeout: a worker that cannot say how busy it is
        within seconds is treated as gone."""
        reply = await self.post_json(worker_address, "/worker_get_status", {}, timeout_s)
        try:
            return parse_worker_status(reply)
        except InvalidRequest as exc:
            raise WorkerUnavailable(
                worker_address, f"/worker_get_status answered {repr(reply)[:200]}: {exc.message}"
            ) from exc

    async def model_details(self, worker_address: str, model: str) -> ModelDetails:
        reply = await self.post_json(worker_address, "/model_details", {"model": model})
        if not isinstance(reply, dict):
            raise WorkerUnavailable(worker_address, "/model_details sent no model details")
        return ModelDetails(
            context_length=int(reply.get("context_length") or DEFAULT_CONTEXT_LENGTH),
            multimodal=bool(reply.get("multimodal", True)),
            tokens_per_image=int(reply.get("tokens_per_image") or 0),
        )

    async def conversation_template(self, worker_address: str, model: str) -> dict[str, Any]:
        reply = await self.post_json(worker_address, "/worker_get_conv_template", {"model": model})
        conv = reply.get("conv") if isinstance(reply, dict) else None
        if not isinstance(conv, dict):
            raise WorkerUnavailable(
                worker_address, "/worker_get_conv_template sent no conversation template"
            )
        return conv

    async def stream_generate(
        self, worker_address: str, payload: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        """Streams `/worker_generate_stream` frames (cumulative `text`, `error_code`, ...).

        A worker that refuses the request answers with one error frame (HTTP 400): it is yielded
        like any other frame. Raises `WorkerUnavailable` if the worker cannot be reached or the
        stream breaks before its end.
        """
        url = worker_address.rstrip("/") + "/worker_generate_stream"
        content = encode_payload(payload)
        try:
            async with self._client.stream(
                "POST", url, content=content, headers=_JSON_HEADERS
            ) as response:
                _raise_if_busy(worker_address, response)
                async for frame in split_frames(response.aiter_bytes()):
                    yield frame
        except httpx.TimeoutException as exc:
            raise WorkerUnavailable(worker_address, "generation timed out", True) from exc
        except (httpx.HTTPError, ValueError) as exc:
            raise WorkerUnavailable(worker_address, f"{type(exc).__name__}: {exc}") from exc
