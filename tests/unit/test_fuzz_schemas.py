"""Schemathesis on the OpenAPI schemas of the worker, the controller and the API, each built on
fakes through its container as in `test_fuzz_bodies.py`: every operation of each schema, with
bodies that follow its declared request body and bodies that break it (`mode = all`: missing and
mistyped fields, out-of-range numbers, other methods and content types), never gets a 5xx (the
controller's 503 "no worker / worker unreachable" aside), an error answer has the shape the
service promises (one FastChat `{"text", "error_code"}` frame or object from the worker and the
controller; `{"error": {"message", "type", "code"}}` from the API), a 2xx stream reads to its end
in frames or server-sent events, and the service answers a normal request afterwards.

The routes read their bodies themselves; their request bodies are declared in the schemas
(`vilaserve.entrypoints.shared.openapi_bodies`), so schemathesis generates meaningful bodies. On
the API and the controller's relay each body is also sent once more naming the served model, so
the random sampling parameters reach the (fake) workers.

A fixed, deterministic budget here (`SCHEMA_FUZZ_EXAMPLES` per operation, plus schemathesis'
coverage cases); `python benchmarks/fuzz_schemas.py --examples 2000` runs the long one. Answers to
a method a route does not take are FastAPI's own 405 `{"detail": ...}` on the worker and the
controller (outside their protocol); the API turns them into its error shape.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from api_fakes import MODEL, FakeDirectory, FakeWorkerGateway, chat_body
from dependency_injector import providers
from fakes import FakeConstraintCompiler, FakeController, FakeTextGenerator, FakeVisionEncoder
from hypothesis import HealthCheck, settings
from test_controller_http import FakeGateway

from vilaserve.domain.shared.errors import WorkerUnavailable
from vilaserve.domain.shared.worker_status import WorkerStatus
from vilaserve.entrypoints.api.app import create_api_app
from vilaserve.entrypoints.api.container import ApiContainer
from vilaserve.entrypoints.api.settings import ApiSettings
from vilaserve.entrypoints.controller.app import create_controller_app
from vilaserve.entrypoints.controller.container import ControllerContainer
from vilaserve.entrypoints.controller.settings import ControllerSettings
from vilaserve.entrypoints.worker.app import create_worker_app
from vilaserve.entrypoints.worker.container import WorkerContainer
from vilaserve.entrypoints.worker.settings import WorkerSettings

EXAMPLES = int(os.environ.get("SCHEMA_FUZZ_EXAMPLES", "10"))
STATS_FILE = os.environ.get("SCHEMA_FUZZ_STATS", "")  # a JSON file for the long run's summary
BASE_URL = "http://testserver"
CHECK_MODEL = "fuzz-check-model"  # served by one worker only the checks use
CHECK_WORKER = "http://127.0.0.1:1"

CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {
            "mode": "all",
            "max-examples": EXAMPLES,
            "deterministic": True,
            "database": "none",
        },
        "max-stream-events": 100_000,  # read every SSE stream to its end
        "phases": {"stateful": {"enabled": False}},
    }
)
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


# --- the services on fakes ----------------------------------------------------------------


class AnyWorkerGateway(FakeGateway):
    """Every address is a worker serving `fuzz-model`, except about a third of them (by a hash
    of the address), which cannot be reached; the checks' own worker always answers."""

    FRAMES = ({"text": "Hi", "error_code": 0}, {"text": "Hi there", "error_code": 0})

    def _reachable(self, address: str) -> bool:
        return address == CHECK_WORKER or zlib.crc32(address.encode()) % 3 != 0

    async def get_status(self, worker_address: str, timeout_s: float = 5.0) -> WorkerStatus:
        if not self._reachable(worker_address):
            raise WorkerUnavailable(worker_address, "connection refused")
        names = (CHECK_MODEL,) if worker_address == CHECK_WORKER else ("fuzz-model",)
        return WorkerStatus(names, 1, 0)

    async def stream_generate(
        self, worker_address: str, payload: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        if not self._reachable(worker_address):
            raise WorkerUnavailable(worker_address, "connection refused")
        for frame in self.FRAMES:
            yield dict(frame)


@dataclass
class Service:
    name: str
    build: Callable[[], tuple[Any, Any]]  # -> (app, container)
    error_shape: Callable[[str, Any], None]  # (path, response)
    ok_shape: Callable[[str, Any], None]
    allowed_5xx: dict[str, set[int]] = field(default_factory=dict)  # path -> statuses
    model_field: dict[str, str] = field(default_factory=dict)  # path -> model to resend with


def build_worker() -> tuple[Any, Any]:
    container = WorkerContainer(
        settings=WorkerSettings(
            model_path="/models/VILA1.5-3b", register_with_controller=False, log_format="text"
        )
    )
    container.text_generator.override(providers.Object(FakeTextGenerator()))
    container.vision_encoder.override(providers.Object(FakeVisionEncoder()))
    container.constraint_compiler.override(providers.Object(FakeConstraintCompiler()))
    container.controller_client.override(providers.Object(FakeController()))
    return create_worker_app(container), container


def build_controller() -> tuple[Any, Any]:
    container = ControllerContainer(settings=ControllerSettings(log_format="text"))
    container.worker_gateway.override(providers.Object(AnyWorkerGateway()))
    return create_controller_app(container), container


def build_api() -> tuple[Any, Any]:
    container = ApiContainer(settings=ApiSettings(log_format="text"))
    container.model_directory.override(providers.Object(FakeDirectory()))
    container.worker_gateway.override(providers.Object(FakeWorkerGateway()))
    container.image_fetcher.override(providers.Object(None))
    return create_api_app(container), container


# --- what an answer must look like ---------------------------------------------------------

FRAME_PATHS = {"/worker_generate_stream"}


def frames_of(content: bytes) -> list[dict[str, Any]]:
    assert content.endswith(b"\0"), f"a frame stream ends with NUL: {content[-200:]!r}"
    frames = [json.loads(part) for part in content[:-1].split(b"\0")]
    for frame in frames:
        assert isinstance(frame, dict), frame
        assert isinstance(frame.get("text"), str) and isinstance(frame.get("error_code"), int)
    return frames


def fastchat_error(path: str, response: Any) -> None:
    """One `{"text", "error_code"}` (a frame on the stream routes), naming the problem."""
    if response.status_code == 405:  # FastAPI's, for a method the route does not take
        assert "detail" in response.json(), response.content
        return
    if path in FRAME_PATHS:
        frames = frames_of(response.content)
        assert len(frames) == 1, f"one error frame, got {frames}"
        error = frames[0]
    else:
        error = response.json()
        assert isinstance(error, dict) and isinstance(error.get("text"), str), error
    assert error["error_code"] >= 40000 and error["text"], error
    if response.status_code == 429:
        assert error["error_code"] == 42903 and header(response, "retry-after"), error


def header(response: Any, name: str) -> str:
    """A header of a schemathesis response (lower-case names, each with a list of values)."""
    value = response.headers.get(name.lower())
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return str(value or "")


def is_json(response: Any) -> bool:
    return header(response, "content-type").startswith("application/json")


def fastchat_ok(path: str, response: Any) -> None:
    if path in FRAME_PATHS:
        frames = frames_of(response.content)
        assert frames and frames[-1]["error_code"] == 0, frames
    elif is_json(response):
        response.json()  # JSON, whatever it holds


def openai_error(path: str, response: Any) -> None:
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("message"), str) and error["message"], error
    assert isinstance(error.get("type"), str) and "code" in error, error
    if response.status_code in (429, 503):
        assert header(response, "retry-after"), response.headers


def openai_ok(path: str, response: Any) -> None:
    if is_json(response):
        response.json()
    if not header(response, "content-type").startswith("text/event-stream"):
        return
    events = [
        line.removeprefix("data: ")
        for line in response.content.decode().split("\n\n")
        if line.startswith("data: ")
    ]
    assert events and not response.stream_cut_short, response.content
    payloads = [json.loads(e) for e in events if e != "[DONE]"]
    assert all(isinstance(p, dict) for p in payloads), payloads
    ended_in_error = bool(payloads) and "error" in payloads[-1]
    assert events[-1] == "[DONE]" or ended_in_error, events[-3:]


SERVICES = {
    "worker": Service("worker", build_worker, fastchat_error, fastchat_ok),
    "controller": Service(
        "controller",
        build_controller,
        fastchat_error,
        fastchat_ok,
        # FastChat's 50005 (no worker serves the model) and 50006 (a worker not reachable).
        allowed_5xx={"/worker_generate_stream": {503}, "/register_worker": {503}},
        model_field={"/worker_generate_stream": CHECK_MODEL},
    ),
    "api": Service(
        "api",
        build_api,
        openai_error,
        openai_ok,
        model_field={"/v1/chat/completions": MODEL, "/v1/completions": MODEL},
    ),
}


def openapi_of(service: Service) -> dict[str, Any]:
    app, _ = service.build()
    return app.openapi()  # type: ignore[no-any-return]


SCHEMAS = {
    name: schemathesis.openapi.from_dict(openapi_of(service), config=CONFIG)
    for name, service in SERVICES.items()
}


# --- running ----------------------------------------------------------------------------------


@dataclass
class Live:
    service: Service
    app: Any
    schema: Any


STATS: dict[str, dict[str, Any]] = defaultdict(
    lambda: {
        "cases": 0,
        "statuses": Counter(),
        "resent_statuses": Counter(),  # the same body naming the served model
        "phases": Counter(),
        "seconds": 0.0,
    }
)


@pytest.fixture(scope="module", autouse=True)
def _write_stats() -> Iterator[None]:
    yield
    if STATS_FILE:
        report = {
            label: {k: dict(v) if isinstance(v, Counter) else v for k, v in entry.items()}
            for label, entry in STATS.items()
        }
        Path(STATS_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def live(name: str) -> Iterator[Live]:
    service = SERVICES[name]
    app, _ = service.build()
    try:
        yield Live(service, app, SCHEMAS[name])
    finally:
        stop_lifespans()


def stop_lifespans() -> None:
    """Schemathesis starts an app's lifespan on its first request and keeps it running until
    exit; stop it with the module (the next module may wire the routes to other containers)."""
    try:
        from schemathesis.python.asgi import shutdown_lifespans
    except ImportError:  # another schemathesis layout: they stop at exit
        return
    shutdown_lifespans()


@pytest.fixture(scope="module")
def worker() -> Iterator[Live]:
    yield from live("worker")


@pytest.fixture(scope="module")
def controller() -> Iterator[Live]:
    yield from live("controller")


@pytest.fixture(scope="module")
def api() -> Iterator[Live]:
    yield from live("api")


def call(target: Live, case: Any) -> Any:
    return case.call(app=target.app, base_url=BASE_URL)


def judge(target: Live, case: Any, response: Any) -> None:
    service, path = target.service, case.operation.path
    status = response.status_code
    where = f"{case.method} {case.formatted_path} body={case.body!r:.300}"
    assert status < 500 or status in service.allowed_5xx.get(path, set()), (
        where,
        status,
        response.content[:500],
    )
    try:
        if status >= 400:
            service.error_shape(path, response)
        else:
            service.ok_shape(path, response)
    except (AssertionError, ValueError) as exc:
        raise AssertionError(f"{where} -> {status}: {response.content[:500]!r}: {exc}") from exc


def still_serves(target: Live) -> None:
    """The service answers a normal request after whatever it was just sent."""
    schema, name = target.schema, target.service.name
    if name == "worker":
        case = schema["/worker_generate"]["POST"].Case(body={"prompt": "q"})
        reply = call(target, case)
        assert reply.status_code == 200 and reply.json()["error_code"] == 0, reply.content
    elif name == "controller":
        body = {"model": CHECK_MODEL, "prompt": "q"}
        reply = call(target, schema["/worker_generate_stream"]["POST"].Case(body=body))
        assert reply.status_code == 200, reply.content
        assert frames_of(reply.content)[-1]["error_code"] == 0
    else:
        reply = call(target, schema["/v1/chat/completions"]["POST"].Case(body=chat_body()))
        assert reply.status_code == 200, reply.content
        assert reply.json()["choices"][0]["message"]["content"], reply.content


def run_case(target: Live, case: Any) -> None:
    label = f"{target.service.name} {case.operation.label}"
    entry = STATS[label]
    started = time.perf_counter()
    response = call(target, case)
    entry["cases"] += 1
    entry["statuses"][str(response.status_code)] += 1
    entry["phases"][case.meta.phase.name.value if case.meta else "explicit"] += 1
    judge(target, case, response)
    model = target.service.model_field.get(case.operation.path)
    if (
        model is not None
        and isinstance(case.body, dict)
        and case.method.upper() == case.operation.method.upper()
    ):
        # The same parameters once more, naming the model that is served.
        again = case.operation.Case(body={**case.body, "model": model}, media_type=case.media_type)
        response = call(target, again)
        entry["resent_statuses"][str(response.status_code)] += 1
        judge(target, again, response)
    still_serves(target)
    entry["seconds"] += time.perf_counter() - started


@SCHEMAS["worker"].parametrize()
@FUZZ_SETTINGS
def test_worker_schema(case: Any, worker: Live) -> None:
    run_case(worker, case)


@SCHEMAS["controller"].parametrize()
@FUZZ_SETTINGS
def test_controller_schema(case: Any, controller: Live) -> None:
    # The checks' worker: registered without heartbeats, so it never expires.
    status = {"model_names": [CHECK_MODEL], "speed": 1, "queue_length": 0}
    registration = {"worker_name": CHECK_WORKER, "worker_status": status}
    register = controller.schema["/register_worker"]["POST"].Case(
        body={**registration, "check_heart_beat": False}
    )
    assert call(controller, register).status_code == 200
    run_case(controller, case)


@SCHEMAS["api"].parametrize()
@FUZZ_SETTINGS
def test_api_schema(case: Any, api: Live) -> None:
    run_case(api, case)
