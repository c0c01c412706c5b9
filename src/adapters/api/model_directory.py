"""The controller as the API sees it: FastChat's `/list_models`, `/get_worker_address` and
`/refresh_all_workers`."""

from __future__ import annotations

import contextlib
from typing import Any

import httpx

from vilaserve.adapters.shared.worker_client import bearer
from vilaserve.domain.api.ports import ModelDirectory
from vilaserve.domain.shared.errors import ControllerUnavailable


class HttpModelDirectory(ModelDirectory):
    def __init__(
        self, controller_address: str, timeout_s: float = 5.0, internal_token: str | None = None
    ) -> None:
        self._base = controller_address.rstrip("/")
        # One pooled client: these lookups sit on every uncached request's path.
        self._client = httpx.AsyncClient(
            headers=bearer(internal_token), timeout=httpx.Timeout(timeout_s)
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def list_models(self) -> list[str]:
        reply = await self._post("/list_models", {})
        models = reply.get("models") if isinstance(reply, dict) else None
        if not isinstance(models, list):
            raise ControllerUnavailable(self._base, "/list_models sent no model list")
        return [str(m) for m in models]

    async def worker_address(self, model: str) -> str | None:
        reply = await self._post("/get_worker_address", {"model": model})
        if not isinstance(reply, dict) or not isinstance(reply.get("address", ""), str):
            raise ControllerUnavailable(self._base, "/get_worker_address sent no address")
        return reply.get("address") or None

    async def refresh_workers(self) -> None:
        # The request fails over either way; an unreachable controller expires the worker later.
        with contextlib.suppress(ControllerUnavailable):
            await self._post("/refresh_all_workers", {})

    async def _post(self, path: str, payload: dict[str, Any]) -> Any:
        try:
            response = await self._client.post(self._base + path, json=payload)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ControllerUnavailable(
                self._base,
                f"{path}: {type(exc).__name__}: {exc}",
                isinstance(exc, httpx.TimeoutException),
            ) from exc
