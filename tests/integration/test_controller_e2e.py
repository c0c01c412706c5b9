"""The real controller on loopback with two real workers (tiny VILA checkpoints, each in a
process of its own) behind it: dispatch, expiry, restarts, nesting, failures, and TinyChat's web
client going through the controller."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from servers import (
    ChildServer,
    ServerThread,
    free_port,
    start_controller,
    start_worker,
    wait_for,
    worker_process,
)

from vilaserve.adapters.offline.checkpoints.tiny_vila import make_png_b64
from vilaserve.domain.shared.errors import ErrorCode

VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
HEARTBEAT_S = 0.25

pytestmark = pytest.mark.subprocess  # the two workers run as child processes


def post(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    response = httpx.post(url + path, json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def controller_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def workers(tiny_vila_siglip: Path, controller_port: int) -> Iterator[list[ChildServer]]:
    """Two workers of one model; they beat often and retry fast, so a controller restarted at
    `controller_port` knows them again within about a second."""
    pair = []
    for _ in range(2):
        port = free_port()
        pair.append(
            worker_process(
                tiny_vila_siglip,
                port,
                "--controller-address",
                f"http://127.0.0.1:{controller_port}",
                "--worker-address",
                f"http://127.0.0.1:{port}",
                "--heartbeat-interval-s",
                str(HEARTBEAT_S),
                VILASERVE_HEARTBEAT_RETRY_MAX_S="0.5",
            )
        )
    try:
        for worker in pair:
            worker.start()  # both load at once
        for worker in pair:
            worker.wait_ready()
        yield pair
    finally:
        for worker in pair:
            worker.stop()


@contextmanager
def controller(controller_port: int, **settings: object) -> Iterator[ServerThread]:
    """A fresh controller at the workers' controller address, once both have registered."""
    with start_controller(port=controller_port, **settings) as server:
        wait_for(lambda: post(server.url, "/worker_get_status")["speed"] == 2, timeout=30)
        yield server


def tinychat_stream(worker_addr: str, pload: dict[str, Any]) -> list[str]:
    """What TinyChat's gradio web server does with one request (`http_bot`): POST with a 10 s
    timeout, split the body on NUL, cut the echoed prompt off by length, stop on an error."""
    prompt = pload["prompt"]
    response = requests.post(
        worker_addr + "/worker_generate_stream",
        headers={"User-Agent": "TinyChat AWQ Chatbot"},
        json=pload,
        stream=True,
        timeout=10,
    )
    shown: list[str] = []
    for chunk in response.iter_lines(decode_unicode=False, delimiter=b"\0"):
        if chunk:
            data = json.loads(chunk.decode())
            if data["error_code"] == 0:
                shown.append(data["text"][len(prompt) :].strip())
            else:
                shown.append(data["text"] + f" (error_code: {data['error_code']})")
                break
    return shown


def tinychat_request(model: str, question: str = "What is in the picture?") -> dict[str, Any]:
    prompt = f"{VICUNA} USER: <image>\n{question} ASSISTANT:"
    return {
        "model": model,
        "prompt": prompt,
        "temperature": 0.0,
        "top_p": 0.7,
        "max_new_tokens": 16,
        "stop": "</s>",  # conv.sep2 of the vicuna template
        "images": [make_png_b64(48, 32, "blue")],
    }


def frames(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", url + "/worker_generate_stream", json=body, timeout=30) as r:
        raw = b"".join(r.iter_bytes())
    return [json.loads(part) for part in raw.split(b"\0") if part]


def test_tinychat_client_through_the_controller_gets_the_workers_answer(
    workers: list[ChildServer], controller_port: int, tiny_vila_siglip: Path
) -> None:
    model = tiny_vila_siglip.name
    pload = tinychat_request(model)
    direct = [tinychat_stream(w.url, pload) for w in workers]
    assert direct[0] == direct[1] and direct[0][-1]  # one model, one greedy answer
    with controller(controller_port) as control:
        # TinyChat's model list: refresh, then list.
        assert post(control.url, "/refresh_all_workers") is None
        assert post(control.url, "/list_models") == {"models": [model]}
        assert post(control.url, "/list_multimodal_models") == {"models": [model]}
        assert post(control.url, "/list_language_models") == {"models": []}
        # TinyChat's own path: ask for an address, then talk to that worker.
        address = post(control.url, "/get_worker_address", {"model": model})["address"]
        assert address in {w.url for w in workers}
        assert tinychat_stream(address, pload) == direct[0]
        # Through the controller's proxy, twice (shortest_queue sends them to both workers):
        # the same frames, one for one, so the client sees every token as the worker makes it.
        for _ in range(2):
            assert tinychat_stream(control.url, pload) == direct[0]


def test_shortest_queue_sends_work_to_the_less_busy_worker(
    workers: list[ChildServer], controller_port: int
) -> None:
    busy, idle = workers
    long_job = {"prompt": "USER: hi ASSISTANT:", "temperature": 0, "max_new_tokens": 400}
    with controller(controller_port, dispatch_method="shortest_queue") as control:
        # Idle workers take turns.
        picks = [
            post(control.url, "/get_worker_address", {"model": model_of(workers)})["address"]
            for _ in range(10)
        ]
        assert min(picks.count(w.url) for w in workers) >= 3, picks
        # Generations straight to one worker: its heartbeats report the queue. The picks
        # only prove something while that queue is still reported, so a round whose queue
        # drained before the picks were done (a fast machine) is inconclusive and repeated.
        for _attempt in range(3):
            # Picks count against a worker until its next heartbeat: start from real queues
            # only, so that the summed queue below can only come from the busy worker.
            wait_for(lambda: post(control.url, "/worker_get_status")["queue_length"] == 0)
            with ThreadPoolExecutor(8) as pool:
                jobs = [
                    pool.submit(
                        httpx.post, busy.url + "/worker_generate", json=long_job, timeout=120
                    )
                    for _ in range(8)
                ]
                wait_for(lambda: post(control.url, "/worker_get_status")["queue_length"] >= 4)
                picks = [
                    post(control.url, "/get_worker_address", {"model": model_of(workers)})[
                        "address"
                    ]
                    for _ in range(3)
                ]
                still_busy = post(control.url, "/worker_get_status")["queue_length"] >= 2
                assert all(job.result().json()["error_code"] == 0 for job in jobs)
            if still_busy:
                break
        assert still_busy, "the busy worker's queue drained before three picks, three times"
        assert picks == [idle.url] * 3


def test_lottery_spreads_requests_over_both_workers(
    workers: list[ChildServer], controller_port: int
) -> None:
    with controller(controller_port, dispatch_method="lottery") as control:
        picks = [
            post(control.url, "/get_worker_address", {"model": model_of(workers)})["address"]
            for _ in range(40)
        ]
    assert set(picks) == {w.url for w in workers}
    assert min(picks.count(w.url) for w in workers) >= 8, picks


def test_a_worker_that_stops_expires_and_the_others_stay(
    workers: list[ChildServer], controller_port: int, tiny_vila_siglip: Path
) -> None:
    with controller(controller_port, heart_beat_expiration=1.5) as control:
        port = free_port()
        extra = start_worker(
            tiny_vila_siglip,
            model_name="tiny-leaving",
            register_with_controller=True,
            controller_address=control.url,
            worker_address=f"http://127.0.0.1:{port}",
            port=port,
            heartbeat_interval_s=HEARTBEAT_S,
        )
        with extra:
            wait_for(lambda: "tiny-leaving" in post(control.url, "/list_models")["models"])
        stopped = time.monotonic()
        # Gone only when its heartbeats have been missing for the expiration, not before.
        assert "tiny-leaving" in post(control.url, "/list_models")["models"]
        wait_for(lambda: "tiny-leaving" not in post(control.url, "/list_models")["models"], 10)
        assert time.monotonic() - stopped > 1.0
        assert post(control.url, "/get_worker_address", {"model": "tiny-leaving"}) == {
            "address": ""
        }
        assert post(control.url, "/worker_get_status")["speed"] == 2  # both others still beat


def test_workers_register_again_after_a_controller_restart(
    workers: list[ChildServer], controller_port: int, tiny_vila_siglip: Path
) -> None:
    with controller(controller_port) as first:
        assert post(first.url, "/list_models") == {"models": [tiny_vila_siglip.name]}
    # A new controller at the same address knows nobody: the workers' next heartbeats get
    # `exist: false` and they register again (`controller()` waits for both).
    with controller(controller_port) as second:
        assert post(second.url, "/list_models") == {"models": [tiny_vila_siglip.name]}
        assert len(frames(second.url, tinychat_request(tiny_vila_siglip.name))) > 1


def test_a_controller_registers_as_a_worker_of_another(
    workers: list[ChildServer], controller_port: int, tiny_vila_siglip: Path
) -> None:
    model = tiny_vila_siglip.name
    pload = tinychat_request(model, "Describe it.")
    expected = tinychat_stream(workers[0].url, pload)
    parent = ChildServer(["controller", "--log-format", "text"], free_port(), "/test_connection")
    with controller(controller_port) as child, parent:
        # As FastChat nests controllers: no status given, so the parent asks the child for it.
        registration = {"worker_name": child.url, "check_heart_beat": False, "multimodal": True}
        assert post(parent.url, "/register_worker", registration) is None
        assert post(parent.url, "/worker_get_status") == {
            "model_names": [model],
            "speed": 2,
            "queue_length": 0,
        }
        assert post(parent.url, "/list_multimodal_models") == {"models": [model]}
        assert tinychat_stream(parent.url, pload) == expected


def test_unknown_model_and_dead_worker_each_get_one_clear_error_frame(
    workers: list[ChildServer], controller_port: int
) -> None:
    with controller(controller_port) as control:
        started = time.monotonic()
        reply = frames(control.url, {"model": "no-such-model", "prompt": "hi"})
        assert time.monotonic() - started < 2
        assert len(reply) == 1 and reply[0]["error_code"] == ErrorCode.CONTROLLER_NO_WORKER
        assert "'no-such-model'" in reply[0]["text"]

        ghost = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        status = {"model_names": ["ghost"], "speed": 1, "queue_length": 0}
        post(control.url, "/register_worker", {"worker_name": ghost, "worker_status": status})
        reply = frames(control.url, {"model": "ghost", "prompt": "hi"})
        assert len(reply) == 1 and reply[0]["error_code"] == ErrorCode.CONTROLLER_WORKER_TIMEOUT
        assert ghost in reply[0]["text"]
        assert "ghost" not in post(control.url, "/list_models")["models"]  # dropped
        # TinyChat's client shows the message and the code.
        shown = tinychat_stream(control.url, {"model": "ghost", "prompt": "hi"})
        assert shown == [shown[0]] and "(error_code: 50005)" in shown[0]


class StubWorkers:
    """Misbehaving workers, each serving one model: `slow` (a frame, then waits for `release`),
    `silent` (never answers) and `broken` (a frame, then drops the connection)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.app = FastAPI()
        self.app.post("/worker_generate_stream")(self._generate)

    async def _wait_for_release(self) -> None:
        deadline = time.monotonic() + 30
        while not self.release.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _generate(self, body: dict[str, Any]) -> StreamingResponse:
        if body["model"] == "silent":
            await self._wait_for_release()
        return StreamingResponse(self._frames(body["model"]))

    async def _frames(self, model: str) -> AsyncIterator[bytes]:
        yield json.dumps({"text": "first", "error_code": 0}).encode() + b"\0"
        if model == "broken":
            raise RuntimeError("the stub worker crashes mid-stream")
        await self._wait_for_release()
        yield json.dumps({"text": "first second", "error_code": 0}).encode() + b"\0"


def model_of(workers: list[ChildServer]) -> str:
    return post(workers[0].url, "/worker_get_status")["model_names"][0]


def register_stubs(control: ServerThread, stubs: dict[str, ServerThread]) -> None:
    for model, stub in stubs.items():
        status = {"model_names": [model], "speed": 1, "queue_length": 0}
        registration = {"worker_name": stub.url, "worker_status": status}
        post(control.url, "/register_worker", {**registration, "check_heart_beat": False})


def test_frames_pass_through_as_they_come_and_a_slow_worker_blocks_nobody(
    workers: list[ChildServer], controller_port: int
) -> None:
    stubs = StubWorkers()
    model = model_of(workers)
    with controller(controller_port) as control, ServerThread(stubs.app) as slow_stub:
        try:
            register_stubs(control, {"slow": slow_stub})
            body = {"model": "slow", "prompt": ""}
            with httpx.stream("POST", control.url + "/worker_generate_stream", json=body) as slow:
                pieces = slow.iter_bytes()
                # The first frame comes through while the worker still holds back the rest.
                assert json.loads(next(pieces).split(b"\0")[0])["text"] == "first"
                # Meanwhile the controller serves everything else.
                assert model in post(control.url, "/list_models")["models"]
                assert frames(control.url, tinychat_request(model))[-1]["error_code"] == 0
                stubs.release.set()
                rest = b"".join(pieces)
            assert json.loads(rest.split(b"\0")[-2]) == {"text": "first second", "error_code": 0}
        finally:
            stubs.release.set()


def test_silent_and_crashing_workers_end_in_one_error_frame(controller_port: int) -> None:
    stubs = StubWorkers()
    with (
        start_controller(port=controller_port, worker_api_timeout=1.0) as control,
        ServerThread(stubs.app) as silent_stub,
        ServerThread(stubs.app) as broken_stub,
    ):
        try:
            register_stubs(control, {"silent": silent_stub, "broken": broken_stub})
            started = time.monotonic()
            silent = frames(control.url, {"model": "silent", "prompt": ""})
            assert 0.9 < time.monotonic() - started < 10
            assert [f["error_code"] for f in silent] == [ErrorCode.CONTROLLER_WORKER_TIMEOUT]
            assert "did not answer in time" in silent[0]["text"]
            broken = frames(control.url, {"model": "broken", "prompt": ""})
            assert broken[0] == {"text": "first", "error_code": 0}
            assert [f["error_code"] for f in broken[1:]] == [ErrorCode.CONTROLLER_WORKER_TIMEOUT]
            assert broken_stub.url in broken[1]["text"]
            listed = post(control.url, "/list_models")["models"]
            assert "silent" not in listed and "broken" not in listed  # both dropped
        finally:
            stubs.release.set()
