"""Real uvicorn servers on loopback for integration tests, each in a thread of its own."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 120
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


class FakeControllerApp:
    """The two controller endpoints a worker calls, recording what it receives."""

    def __init__(self) -> None:
        self.registrations: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.known: set[str] = set()
        self.app = FastAPI()
        self.app.post("/register_worker")(self._register)
        self.app.post("/receive_heart_beat")(self._heartbeat)

    async def _register(self, request: Request) -> None:
        body = await request.json()
        self.registrations.append(body)
        self.known.add(body["worker_name"])

    async def _heartbeat(self, request: Request) -> dict[str, bool]:
        body = await request.json()
        self.heartbeats.append(body)
        return {"exist": body["worker_name"] in self.known}

    def forget_all(self) -> None:
        self.known.clear()
