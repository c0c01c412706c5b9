"""The worker protocol as the API uses it, over the shared `HttpWorkerClient`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from vilaserve.adapters.shared.worker_client import HttpWorkerClient
from vilaserve.domain.api.chat_prompt import template_from_worker
from vilaserve.domain.api.ports import ModelDetails, WorkerApi
from vilaserve.domain.shared.conversation import ConversationTemplate
from vilaserve.domain.shared.errors import WorkerUnavailable
from vilaserve.domain.shared.generation import StreamChunk, Usage

DEFAULT_CONTEXT_LENGTH = 2048  # FastChat's fallback when a worker has no /model_details


class HttpWorkerApi(WorkerApi):
    def __init__(self, client: HttpWorkerClient) -> None:
        self._client = client

    async def model_details(self, address: str, model: str) -> ModelDetails:
        reply = await self._post(address, "/model_details", {"model": model})
        if not isinstance(reply, dict):
            raise WorkerUnavailable(address, "/model_details sent no model details")
        return ModelDetails(
            context_length=int(reply.get("context_length") or DEFAULT_CONTEXT_LENGTH),
            multimodal=bool(reply.get("multimodal", True)),
            tokens_per_image=int(reply.get("tokens_per_image") or 0),
        )

    async def conversation_template(self, address: str, model: str) -> ConversationTemplate:
        reply = await self._post(address, "/worker_get_conv_template", {"model": model})
        conv = reply.get("conv") if isinstance(reply, dict) else None
        if not isinstance(conv, dict):
            raise WorkerUnavailable(
                address, "/worker_get_conv_template sent no conversation template"
            )
        return template_from_worker(conv)

    async def generate_stream(
        self, address: str, payload: dict[str, Any]
    ) -> AsyncIterator[StreamChunk]:
        async for frame in self._client.stream_generate(address, payload):
            yield _chunk(frame)

    async def _post(self, address: str, path: str, payload: dict[str, Any]) -> Any:
        return await self._client.post_json(address, path, payload)


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
