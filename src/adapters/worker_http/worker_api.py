"""The worker protocol as the API uses it, over the shared `HttpWorkerClient`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from vilaserve.adapters.worker_http.client import HttpWorkerClient, WorkerUnreachable
from vilaserve.domain.api_errors import WorkerUnavailable
from vilaserve.domain.api_ports import ModelDetails, WorkerApi
from vilaserve.domain.chat_prompt import template_from_worker
from vilaserve.domain.conversation import ConversationTemplate
from vilaserve.domain.generation import StreamChunk, Usage

DEFAULT_CONTEXT_LENGTH = 2048  # FastChat's fallback when a worker has no /model_details


class HttpWorkerApi(WorkerApi):
    def __init__(self, client: HttpWorkerClient) -> None:
        self._client = client

    async def model_details(self, address: str, model: str) -> ModelDetails:
        reply = await self._post(address, "/model_details", {"model": model})
        if not isinstance(reply, dict):
            raise WorkerUnavailable(f"the worker at {address} sent no model details")
        return ModelDetails(
            context_length=int(reply.get("context_length") or DEFAULT_CONTEXT_LENGTH),
            multimodal=bool(reply.get("multimodal", True)),
            tokens_per_image=int(reply.get("tokens_per_image") or 0),
        )

    async def conversation_template(self, address: str, model: str) -> ConversationTemplate:
        reply = await self._post(address, "/worker_get_conv_template", {"model": model})
        conv = reply.get("conv") if isinstance(reply, dict) else None
        if not isinstance(conv, dict):
            raise WorkerUnavailable(f"the worker at {address} sent no conversation template")
        return template_from_worker(conv)

    async def generate_stream(
        self, address: str, payload: dict[str, Any]
    ) -> AsyncIterator[StreamChunk]:
        try:
            async for frame in self._client.stream_generate(address, payload):
                yield _chunk(frame)
        except WorkerUnreachable as exc:
            raise WorkerUnavailable(f"the worker at {address} failed: {exc}") from exc

    async def _post(self, address: str, path: str, payload: dict[str, Any]) -> Any:
        try:
            return await self._client.post_json(address, path, payload)
        except WorkerUnreachable as exc:
            raise WorkerUnavailable(f"the worker at {address} failed: {exc}") from exc


def _chunk(frame: Any) -> StreamChunk:
    if not isinstance(frame, dict):
        return StreamChunk(
            text=f"the worker sent a malformed chunk: {frame!r:.200}", error_code=50001
        )
    usage = frame.get("usage")
    finish = frame.get("finish_reason")
    return StreamChunk(
        text=str(frame.get("text") or ""),
        error_code=int(frame.get("error_code") or 0),
        usage=Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        if isinstance(usage, dict)
        else None,
        # Anything else a foreign worker may send (e.g. "abort") still ends the choice.
        finish_reason=finish if finish in ("stop", "length") else ("stop" if finish else None),
    )
