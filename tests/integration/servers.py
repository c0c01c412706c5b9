"""Real uvicorn servers on loopback for integration tests, each in a thread of its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request

from vilaserve.entrypoints.api.app import create_api_app
from vilaserve.entrypoints.api.container import ApiContainer
from vilaserve.entrypoints.api.settings import ApiSettings
from vilaserve.entrypoints.controller.app import create_controller_app
from vilaserve.entrypoints.controller.container import ControllerContainer
from vilaserve.entrypoints.controller.settings import ControllerSettings
from vilaserve.entrypoints.worker.app import create_worker_app
from vilaserve.entrypoints.worker.container import WorkerContainer
from vilaserve.entrypoints.worker.settings import WorkerSettings


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


def start_worker(checkpoint: Path, **overrides: object) -> ServerThread:
    """A real model worker (torch adapters) on `checkpoint`; `port` in `overrides` is used."""
    options: dict[str, object] = {
        "dtype": "float32",
        "register_with_controller": False,
        "log_format": "text",
        **overrides,
    }
    settings = WorkerSettings(model_path=str(checkpoint), **options)  # type: ignore[arg-type]
    port = settings.port if "port" in overrides else None
    container = WorkerContainer(settings=settings)
    return ServerThread(create_worker_app(container), port)


def start_api(controller_address: str, **overrides: object) -> ServerThread:
    """The OpenAI-compatible API server in front of the controller at `controller_address`."""
    options: dict[str, object] = {"log_format": "text", **overrides}
    settings = ApiSettings(controller_address=controller_address, **options)  # type: ignore[arg-type]
    container = ApiContainer(settings=settings)
    return ServerThread(create_api_app(container))


class FakeControllerApp:
    """The controller endpoints workers and the API call, recording what it receives.

    Workers register with their model names; `/list_models` and `/get_worker_address` answer
    from those (the first worker of a model wins), as FastChat's controller does.
    """

    def __init__(self) -> None:
        self.registrations: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.address_lookups: list[str] = []
        self.known: set[str] = set()
        self.models: dict[str, list[str]] = {}  # worker address -> its model names
        self.app = FastAPI()
        self.app.post("/register_worker")(self._register)
        self.app.post("/receive_heart_beat")(self._heartbeat)
        self.app.post("/list_models")(self._list_models)
        self.app.post("/get_worker_address")(self._get_worker_address)

    async def _register(self, request: Request) -> None:
        body = await request.json()
        self.registrations.append(body)
        self.known.add(body["worker_name"])
        status = body.get("worker_status") or {}
        self.models[body["worker_name"]] = list(status.get("model_names") or [])

    async def _list_models(self) -> dict[str, list[str]]:
        names = {m for address, ms in self.models.items() if address in self.known for m in ms}
        return {"models": sorted(names)}

    async def _get_worker_address(self, request: Request) -> dict[str, str]:
        model = (await request.json())["model"]
        self.address_lookups.append(model)
        for address, names in self.models.items():
            if address in self.known and model in names:
                return {"address": address}
        return {"address": ""}

    async def _heartbeat(self, request: Request) -> dict[str, bool]:
        body = await request.json()
        self.heartbeats.append(body)
        return {"exist": body["worker_name"] in self.known}

    def forget_all(self) -> None:
        self.known.clear()


def wait_for(condition: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@dataclass
class ApiStack:
    controller_calls: Counter[str]  # requests the controller received, by path
    controller_url: str
    worker_url: str
    api_url: str
    model: str


@contextmanager
def serving_stack(checkpoint: Path, **worker_overrides: object) -> Iterator[ApiStack]:
    """The real controller, one real worker on `checkpoint` registered with it, and the API,
    on loopback. The controller's requests are counted by path; `worker_overrides` are
    worker settings (e.g. `dtype`)."""
    calls: Counter[str] = Counter()
    container = ControllerContainer(settings=ControllerSettings(log_format="text"))
    app = create_controller_app(container)

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Any]) -> Any:
        calls[request.url.path] += 1
        return await call_next(request)

    with ServerThread(app) as control:
        port = free_port()
        address = f"http://127.0.0.1:{port}"
        worker = start_worker(
            checkpoint,
            register_with_controller=True,
            controller_address=control.url,
            worker_address=address,
            port=port,
            **worker_overrides,
        )
        with worker, start_api(control.url) as api:
            wait_for(lambda: httpx.post(control.url + "/list_models").json()["models"])
            yield ApiStack(calls, control.url, address, api.url, checkpoint.name)


def start_controller(port: int | None = None, **overrides: object) -> ServerThread:
    """The real controller, in this process; `port` lets a test restart it at the same place."""
    options: dict[str, object] = {"log_format": "text", **overrides}
    settings = ControllerSettings(**options)  # type: ignore[arg-type]
    container = ControllerContainer(settings=settings)
    return ServerThread(create_controller_app(container), port)


class ChildServer:
    """A `vilaserve` subcommand in a process of its own, up once `GET ready_path` answers.

    For a process of its own: its memory and file limits measured or set apart, or signals sent
    to it. Its log goes to a file, shown if it fails to start.
    """

    def __init__(
        self,
        args: list[str],
        port: int,
        ready_path: str = "/health",
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._argv = [sys.executable, "-m", "vilaserve.entrypoints.cli", *args, "--port", str(port)]
        self._ready_path = ready_path
        self._env = {**os.environ, **(env or {})}
        # Closed (and so deleted) in stop().
        self._log = tempfile.NamedTemporaryFile(prefix="vilaserve-child-", suffix=".log")  # noqa: SIM115
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ChildServer:
        self.process = subprocess.Popen(
            self._argv, stdout=self._log, stderr=subprocess.STDOUT, env=self._env
        )
        return self

    def wait_ready(self, timeout: float = 120.0) -> ChildServer:
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self._argv} exited with {self.process.returncode}:\n{self.log}"
                )
            try:
                if httpx.get(self.url + self._ready_path, timeout=1).is_success:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self._argv} did not answer in {timeout} s:\n{self.log}")
            time.sleep(0.1)

    @property
    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> ChildServer:
        return self.start().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def worker_process(checkpoint: Path, port: int, *flags: str, **env: str) -> ChildServer:
    """A real model worker in a child process (float32, text logs); `flags` are CLI flags."""
    args = ["worker", "--model-path", str(checkpoint), "--dtype", "float32", "--log-format", "text"]
    return ChildServer([*args, *flags], port, env=env)


def metric(url: str, name: str) -> float:
    """One sample of the worker's /metrics (Prometheus text), summed over its labels."""
    text = httpx.get(url + "/metrics").text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in " {"
    ]
    assert values, f"{name} not in /metrics"
    return sum(values)


@dataclass
class Registered:
    controller_url: str
    worker_url: str
    port: int
    model: str


@contextmanager
def registered_worker(
    checkpoint: Path,
    controller: dict[str, Any] | None = None,
    worker: dict[str, Any] | None = None,
) -> Iterator[Registered]:
    """A real controller (`controller` settings) and one real worker on `checkpoint`
    (`worker` settings) that registered itself at http://127.0.0.1:P and beats every 0.2 s;
    ready once the controller lists its model (asked with the internal token, if set)."""
    controller = controller or {}
    with start_controller(**controller) as control:
        port = free_port()
        address = f"http://127.0.0.1:{port}"
        token = controller.get("internal_token")
        headers = {"authorization": f"Bearer {token}"} if token else {}

        def listed() -> list[str]:
            reply = httpx.post(control.url + "/list_models", headers=headers)
            return list(reply.json()["models"])

        with start_worker(
            checkpoint,
            register_with_controller=True,
            controller_address=control.url,
            worker_address=address,
            port=port,
            heartbeat_interval_s=0.2,
            **(worker or {}),
        ):
            wait_for(lambda: listed() == [checkpoint.name])
            yield Registered(control.url, address, port, checkpoint.name)
