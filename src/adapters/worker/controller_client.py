"""The controller port over HTTP: FastChat / TinyChat `/register_worker` and heartbeats."""

from __future__ import annotations

import httpx

from vilaserve.domain.shared.errors import ControllerUnavailable
from vilaserve.domain.shared.worker_status import WorkerStatus
from vilaserve.domain.worker.ports import ControllerClient


class HttpControllerClient(ControllerClient):
    def __init__(
        self, controller_address: str, timeout_s: float = 5.0, secret: str | None = None
    ) -> None:
        self._base = controller_address.rstrip("/")
        self._timeout = httpx.Timeout(timeout_s)
        # The controller's registration secret, sent with registrations and heartbeats.
        self._headers = {"Authorization": f"Bearer {secret}"} if secret else {}

    async def register(self, worker_address: str, status: WorkerStatus, multimodal: bool) -> None:
        await self._post(
            "/register_worker",
            {
                "worker_name": worker_address,
                "check_heart_beat": True,
                "worker_status": status.to_dict(),
                "multimodal": multimodal,
            },
        )

    async def heartbeat(self, worker_address: str, queue_length: int) -> bool:
        reply = await self._post(
            "/receive_heart_beat", {"worker_name": worker_address, "queue_length": queue_length}
        )
        if not isinstance(reply, dict) or "exist" not in reply:
            raise ControllerUnavailable(self._base, f"unexpected heartbeat reply {reply!r:.200}")
        return bool(reply["exist"])

    async def leave(self, worker_address: str) -> None:
        body = {"worker_name": worker_address, "queue_length": 0, "leaving": True}
        await self._post("/receive_heart_beat", body)

    async def _post(self, path: str, payload: dict[str, object]) -> object:
        url = self._base + path
        try:
            # A fresh client per call: heartbeats are rare, and a controller restart then
            # never leaves us holding a dead keep-alive connection.
            async with httpx.AsyncClient(timeout=self._timeout) as client:
                response = await client.post(url, json=payload, headers=self._headers)
                response.raise_for_status()
                return response.json() if response.content else None
        except (httpx.HTTPError, ValueError) as exc:
            raise ControllerUnavailable(
                self._base,
                f"{path}: {type(exc).__name__}: {exc}",
                isinstance(exc, httpx.TimeoutException),
            ) from exc
