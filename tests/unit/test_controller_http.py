"""The controller's HTTP protocol with a fake worker gateway and a fake clock in the container."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from dependency_injector import providers
from fastapi.testclient import TestClient

from vilaserve.application.controller.proxy_stream import ProxyGenerateStream
from vilaserve.application.controller.worker_directory import WorkerDirectory
from vilaserve.domain.controller.worker_registry import DispatchMethod, WorkerRegistry
from vilaserve.domain.shared.errors import ErrorCode, WorkerBusy, WorkerUnavailable
from vilaserve.domain.shared.worker_gateway import ModelDetails, WorkerGateway
from vilaserve.domain.shared.worker_status import WorkerStatus
from vilaserve.entrypoints.controller.app import create_controller_app
from vilaserve.entrypoints.controller.container import ControllerContainer
from vilaserve.entrypoints.controller.settings import ControllerSettings

Script = list[dict[str, Any] | WorkerUnavailable]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeGateway(WorkerGateway):
    """Workers by address: a status (or failure) and a scripted stream of frames (or failure)."""

    def __init__(self) -> None:
        self.statuses: dict[str, WorkerStatus | WorkerUnavailable] = {}
        self.streams: dict[str, Script] = {}
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.closed: list[str] = []

    async def get_status(self, worker_address: str, timeout_s: float = 5.0) -> WorkerStatus:
        reply = self.statuses.get(
            worker_address, WorkerUnavailable(worker_address, "connection refused")
        )
        if isinstance(reply, WorkerUnavailable):
            raise reply
        return reply

    async def stream_generate(
        self, worker_address: str, payload: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        self.sent.append((worker_address, payload))
        script = self.streams.get(
            worker_address, [WorkerUnavailable(worker_address, "connection refused")]
        )
        try:
            for item in script:
                if isinstance(item, WorkerUnavailable):
                    raise item
                yield item
                await asyncio.sleep(0)
        finally:
            self.closed.append(worker_address)

    # The API's part of the protocol: the controller never asks for it.
    async def model_details(self, worker_address: str, model: str) -> ModelDetails:
        raise AssertionError("the controller asked for /model_details")

    async def conversation_template(self, worker_address: str, model: str) -> dict[str, Any]:
        raise AssertionError("the controller asked for /worker_get_conv_template")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
def container(clock: FakeClock, gateway: FakeGateway) -> Iterator[ControllerContainer]:
    settings = ControllerSettings(heart_beat_expiration=30, log_format="text")
    container = ControllerContainer(settings=settings)
    container.clock.override(providers.Object(clock))
    container.worker_gateway.override(providers.Object(gateway))
    yield container


@pytest.fixture
def client(container: ControllerContainer) -> Iterator[TestClient]:
    with TestClient(create_controller_app(container)) as test_client:
        yield test_client


def register(client: TestClient, address: str, *models: str, multimodal: bool = True) -> None:
    body = {
        "worker_name": address,
        "check_heart_beat": True,
        "worker_status": {"model_names": list(models), "speed": 1, "queue_length": 0},
        "multimodal": multimodal,
    }
    response = client.post("/register_worker", json=body)
    assert response.status_code == 200 and response.json() is None


def stream(client: TestClient, body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    with client.stream("POST", "/worker_generate_stream", json=body) as response:
        raw = b"".join(response.iter_bytes())
    assert raw.endswith(b"\0")
    return response.status_code, [json.loads(part) for part in raw.split(b"\0") if part]


def test_fastchat_listing_endpoints(client: TestClient) -> None:
    register(client, "http://vision:1", "vila-3b")
    register(client, "http://text:1", "llama", multimodal=False)
    assert client.post("/list_models").json() == {"models": ["llama", "vila-3b"]}
    assert client.post("/list_multimodal_models").json() == {"models": ["vila-3b"]}
    assert client.post("/list_language_models").json() == {"models": ["llama"]}
    address = client.post("/get_worker_address", json={"model": "vila-3b"}).json()
    assert address == {"address": "http://vision:1"}
    assert client.post("/get_worker_address", json={"model": "nope"}).json() == {"address": ""}
    assert client.get("/test_connection").json() == "success"


def test_heartbeats_answer_exist_and_expiry_follows_the_clock(
    client: TestClient, clock: FakeClock
) -> None:
    register(client, "http://w:1", "m")
    beat = {"worker_name": "http://w:1", "queue_length": 2}
    assert client.post("/receive_heart_beat", json=beat).json() == {"exist": True}
    status = client.post("/worker_get_status").json()
    assert status == {"model_names": ["m"], "speed": 1, "queue_length": 2}
    clock.now += 31
    assert client.post("/list_models").json() == {"models": []}
    assert client.post("/receive_heart_beat", json=beat).json() == {"exist": False}
    other = {"worker_name": "http://never-registered:1", "queue_length": 0}
    assert client.post("/receive_heart_beat", json=other).json() == {"exist": False}


def test_the_sweep_forgets_silent_workers(clock: FakeClock, container: ControllerContainer) -> None:
    container.settings.override(
        providers.Object(ControllerSettings(heart_beat_expiration=0.15, log_format="text"))
    )
    with TestClient(create_controller_app(container)) as client:
        register(client, "http://w:1", "m")
        registry: WorkerRegistry = container.registry()
        clock.now += 1
        deadline = time.monotonic() + 5
        while registry.addresses() and time.monotonic() < deadline:
            time.sleep(0.02)  # the sweep runs every expiration / 3 of real time
        assert registry.addresses() == []


def test_registration_without_status_asks_the_worker(
    client: TestClient, gateway: FakeGateway
) -> None:
    gateway.statuses["http://w:1"] = WorkerStatus(("asked",), 1, 0)
    body = {"worker_name": "http://w:1", "check_heart_beat": True, "worker_status": None}
    assert client.post("/register_worker", json=body).status_code == 200
    assert client.post("/list_models").json() == {"models": ["asked"]}
    # A worker that cannot tell its status is not registered.
    silent = {"worker_name": "http://silent:1", "check_heart_beat": True}
    response = client.post("/register_worker", json=silent)
    assert response.status_code == 503
    assert response.json()["error_code"] == ErrorCode.CONTROLLER_WORKER_TIMEOUT
    assert "http://silent:1" in response.json()["text"]
    assert client.post("/list_models").json() == {"models": ["asked"]}


def test_refresh_updates_live_workers_and_drops_dead_ones(
    client: TestClient, gateway: FakeGateway
) -> None:
    register(client, "http://alive:1", "old-name")
    register(client, "http://dead:1", "gone")
    gateway.statuses["http://alive:1"] = WorkerStatus(("new-name",), 1, 0)
    assert client.post("/refresh_all_workers").status_code == 200
    assert client.post("/list_models").json() == {"models": ["new-name"]}


def test_a_worker_turning_connections_away_is_busy_not_dead(
    client: TestClient, gateway: FakeGateway
) -> None:
    """Its connection limit full (a flood of slow clients), a worker answers 503: it is
    alive, and neither a refresh nor a refused relay drops it (issue 23's benchmark: the
    controller used to forget it until its next heartbeat)."""
    register(client, "http://flooded:1", "vila")
    gateway.statuses["http://flooded:1"] = WorkerBusy("http://flooded:1", "503")
    gateway.streams["http://flooded:1"] = [WorkerBusy("http://flooded:1", "503")]
    assert client.post("/refresh_all_workers").status_code == 200
    relayed = client.post("/worker_generate_stream", json={"model": "vila", "prompt": "hi"})
    assert relayed.status_code == 503
    assert client.post("/list_models").json() == {"models": ["vila"]}


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/register_worker", b"{oops", "not valid JSON"),
        ("/register_worker", b'{"worker_name": 5}', "'worker_name' must be"),
        ("/receive_heart_beat", b'{"worker_name": "http://w"}', None),
        (
            "/receive_heart_beat",
            b'{"worker_name": "http://w", "queue_length": "x"}',
            "queue_length",
        ),
        ("/get_worker_address", b"{}", "'model'"),
    ],
)
def test_malformed_bodies_get_400_with_a_clear_message(
    client: TestClient, path: str, body: bytes, message: str | None
) -> None:
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    if message is None:  # queue_length may be left out: FastChat's heartbeats always send it
        assert response.status_code == 200
        return
    assert response.status_code == 400
    assert response.json()["error_code"] == ErrorCode.VALIDATION_TYPE_ERROR
    assert message in response.json()["text"]


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", None])
def test_only_json_bodies_are_read_so_web_pages_cannot_post_here(
    client: TestClient, kind: str | None
) -> None:
    """Browsers post text/plain and form bodies cross-site without asking first: a page open
    on the host must not be able to register a worker on a loopback controller."""
    body = b'{"worker_name": "http://evil:1", "check_heart_beat": true, "worker_status": {}}'
    headers = {"content-type": kind} if kind else {}
    response = client.post("/register_worker", content=body, headers=headers)
    assert response.status_code == 415
    assert "application/json" in response.json()["text"]
    assert client.post("/list_models").json() == {"models": []}


def test_oversized_and_deeply_nested_bodies_are_refused_clearly(client: TestClient) -> None:
    big = b'{"model": "' + b"x" * (65 * 1024 * 1024) + b'"}'
    response = client.post(
        "/get_worker_address", content=big, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and "limit" in response.json()["text"]
    deep = b"[" * 100_000 + b"]" * 100_000
    response = client.post(
        "/get_worker_address", content=deep, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "nested too deeply" in response.json()["text"]


def test_a_workers_refusal_before_its_first_token_keeps_its_status(
    client: TestClient, gateway: FakeGateway
) -> None:
    register(client, "http://w:1", "m")
    refusal = {"text": "the worker is busy", "error_code": 42903}
    gateway.streams["http://w:1"] = [refusal]
    status, frames = stream(client, {"model": "m", "prompt": "hi"})
    assert (status, frames) == (429, [refusal])


def test_stream_relays_the_workers_frames(client: TestClient, gateway: FakeGateway) -> None:
    register(client, "http://w:1", "m")
    frames = [{"text": "He", "error_code": 0}, {"text": "Hello", "error_code": 0}]
    gateway.streams["http://w:1"] = list(frames)
    body = {"model": "m", "prompt": "hi", "temperature": 0.0, "images": ["aGk="]}
    assert stream(client, body) == (200, frames)
    assert gateway.sent == [("http://w:1", body)]  # forwarded untouched


def test_unknown_model_gets_one_no_worker_frame_naming_it(
    client: TestClient, gateway: FakeGateway
) -> None:
    register(client, "http://w:1", "vila-3b")
    status, frames = stream(client, {"model": "vila-13b", "prompt": "hi"})
    assert status == 503 and len(frames) == 1
    assert frames[0]["error_code"] == ErrorCode.CONTROLLER_NO_WORKER
    assert "'vila-13b'" in frames[0]["text"] and "'vila-3b'" in frames[0]["text"]
    assert gateway.sent == []


def test_a_request_without_model_is_refused(client: TestClient) -> None:
    status, frames = stream(client, {"prompt": "hi"})
    assert status == 400 and len(frames) == 1
    assert frames[0]["error_code"] == ErrorCode.VALIDATION_TYPE_ERROR


def test_dead_worker_gets_one_timeout_frame_and_is_dropped(
    client: TestClient, gateway: FakeGateway
) -> None:
    register(client, "http://dead:1", "m")
    status, frames = stream(client, {"model": "m", "prompt": "hi"})
    assert status == 503 and len(frames) == 1
    assert frames[0]["error_code"] == ErrorCode.CONTROLLER_WORKER_TIMEOUT
    assert "http://dead:1" in frames[0]["text"] and "connection refused" in frames[0]["text"]
    assert client.post("/list_models").json() == {"models": []}
    # With the worker gone, the next request is a plain "no worker" (one frame again).
    _, again = stream(client, {"model": "m", "prompt": "hi"})
    assert [f["error_code"] for f in again] == [ErrorCode.CONTROLLER_NO_WORKER]


def test_a_stream_that_breaks_ends_with_one_error_frame(
    client: TestClient, gateway: FakeGateway
) -> None:
    register(client, "http://w:1", "m")
    gateway.streams["http://w:1"] = [
        {"text": "partial", "error_code": 0},
        WorkerUnavailable("http://w:1", "generation timed out", timed_out=True),
    ]
    status, frames = stream(client, {"model": "m", "prompt": "hi"})
    assert status == 200
    assert frames[0] == {"text": "partial", "error_code": 0}
    assert len(frames) == 2 and frames[1]["error_code"] == ErrorCode.CONTROLLER_WORKER_TIMEOUT
    assert "did not answer in time" in frames[1]["text"]
    assert gateway.closed == ["http://w:1"]


def test_a_worker_error_frame_is_relayed_as_is(client: TestClient, gateway: FakeGateway) -> None:
    register(client, "http://w:1", "m")
    refusal = {"text": "2 '<image>' placeholders but 1 images", "error_code": 40001}
    gateway.streams["http://w:1"] = [refusal]
    assert stream(client, {"model": "m", "prompt": "hi"})[1] == [refusal]
    assert client.post("/list_models").json() == {"models": ["m"]}  # the worker is fine


def test_a_client_leaving_early_closes_the_workers_stream() -> None:
    async def scenario() -> list[str]:
        gateway = FakeGateway()
        gateway.streams["http://w:1"] = [{"text": str(i), "error_code": 0} for i in range(100)]
        registry = WorkerRegistry(30)
        registry.register("http://w:1", WorkerStatus(("m",), 1, 0), True, True)
        directory = WorkerDirectory(registry, gateway, DispatchMethod.SHORTEST_QUEUE)
        frames = await ProxyGenerateStream(directory, gateway).open({"model": "m"})
        assert (await anext(frames))["text"] == "0"
        assert gateway.closed == []
        await frames.aclose()  # type: ignore[attr-defined]
        return gateway.closed

    assert asyncio.run(scenario()) == ["http://w:1"]


def test_nested_status_aggregates_live_workers(client: TestClient) -> None:
    register(client, "http://a:1", "vila-8b")
    register(client, "http://b:1", "vila-3b")
    client.post("/receive_heart_beat", json={"worker_name": "http://a:1", "queue_length": 4})
    assert client.post("/worker_get_status").json() == {
        "model_names": ["vila-3b", "vila-8b"],
        "speed": 2,
        "queue_length": 4,
    }


def test_dispatch_method_comes_from_the_settings(container: ControllerContainer) -> None:
    container.settings.override(
        providers.Object(ControllerSettings(dispatch_method="lottery", log_format="text"))
    )
    container.random_source.override(providers.Object(_AlwaysLast()))
    with TestClient(create_controller_app(container)) as client:
        register(client, "http://a:1", "m")
        register(client, "http://b:1", "m")
        picks = {client.post("/get_worker_address", json={"model": "m"}).json()["address"]}
        assert picks == {"http://b:1"}


class _AlwaysLast:
    def random(self) -> float:
        return 0.999


def secured_client(gateway: FakeGateway, secret: str) -> TestClient:
    settings = ControllerSettings(log_format="text", registration_secret=secret)
    container = ControllerContainer(settings=settings)
    container.worker_gateway.override(providers.Object(gateway))
    return TestClient(create_controller_app(container))


def registration(address: str, *models: str) -> dict[str, Any]:
    status = {"model_names": list(models), "speed": 1, "queue_length": 0}
    return {"worker_name": address, "check_heart_beat": True, "worker_status": status}


def test_with_a_secret_only_its_holders_register_and_heart_beat(gateway: FakeGateway) -> None:
    with secured_client(gateway, "s3cret") as client:
        body = registration("http://evil:1", "vila")
        missing = client.post("/register_worker", json=body)
        assert missing.status_code == 401 and missing.json()["error_code"] == 40101
        wrong = client.post("/register_worker", json=body, headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401 and wrong.json()["error_code"] == 40102
        assert client.post("/list_models").json() == {"models": []}
        beat = client.post("/receive_heart_beat", json={"worker_name": "http://evil:1"})
        assert beat.status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/register_worker", json=body, headers=good).status_code == 200
        assert client.post("/list_models").json() == {"models": ["vila"]}
        beat = client.post(
            "/receive_heart_beat", json={"worker_name": "http://evil:1"}, headers=good
        )
        assert beat.json() == {"exist": True}


def test_a_registered_worker_cannot_be_rebound_to_other_models_by_someone_else(
    client: TestClient, gateway: FakeGateway
) -> None:
    gateway.statuses["http://real:1"] = WorkerStatus(("vila",), 1, 0)
    register(client, "http://real:1", "vila")
    # Someone posts the real worker's URL with other names: the worker itself is asked.
    hijack = client.post("/register_worker", json=registration("http://real:1", "evil"))
    assert hijack.status_code == 200
    assert client.post("/list_models").json() == {"models": ["vila"]}
    gateway.statuses.pop("http://real:1")  # and if it does not answer, nothing changes
    hijack = client.post("/register_worker", json=registration("http://real:1", "evil"))
    assert hijack.status_code == 503
    assert client.post("/list_models").json() == {"models": ["vila"]}


def test_a_live_worker_registered_again_under_any_spelling_keeps_its_flags_and_address(
    client: TestClient, gateway: FakeGateway, clock: FakeClock
) -> None:
    gateway.statuses["http://127.0.0.1:7"] = WorkerStatus(("vila",), 1, 0)
    register(client, "http://127.0.0.1:7", "vila")
    for alias in ("http://127.0.0.1:7", "http://localhost:7", "http://127.0.0.01:7"):
        body = {**registration(alias, "vila"), "multimodal": False, "check_heart_beat": False}
        assert client.post("/register_worker", json=body).status_code == 200, alias
    # Asked where it is reached, never at the alias; still one multimodal worker.
    assert client.post("/list_multimodal_models").json() == {"models": ["vila"]}
    assert client.post("/worker_get_status").json()["speed"] == 1
    assert client.post("/get_worker_address", json={"model": "vila"}).json() == {
        "address": "http://127.0.0.1:7"
    }
    # Its heartbeats (under any spelling) keep it; without them it expires: its check stayed on.
    beat = {"worker_name": "http://localhost:7", "queue_length": 0}
    assert client.post("/receive_heart_beat", json=beat).json() == {"exist": True}
    clock.now += 31
    assert client.post("/list_models").json() == {"models": []}


@pytest.mark.parametrize(
    "name",
    ["http://w:1/path", "http://w:1?x=1", "http://user@w:1", "http://w:1#f", "ftp://w:1", "w:1"],
)
def test_worker_names_are_bare_http_urls(client: TestClient, name: str) -> None:
    response = client.post("/register_worker", json=registration(name, "m"))
    assert response.status_code == 400 and "bare http(s) URL" in response.json()["text"]
