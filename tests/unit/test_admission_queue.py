"""The worker's one admission queue (issue 24): /worker_get_status, the heartbeats and /metrics
read the same counts, through the container's real wiring (the engine over a fake runner)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import pytest
from dependency_injector import providers
from engine_fakes import FakeModelRunner
from fakes import FAKE_PNG_B64, FakeController, FakeVisionEncoder
from fastapi.testclient import TestClient

from vilaserve.application.worker.engine.admission import Admission
from vilaserve.domain.shared.errors import EngineOverloaded, ErrorCode, OutOfDeviceMemory
from vilaserve.domain.shared.generation import StreamChunk
from vilaserve.entrypoints.worker.app import create_worker_app
from vilaserve.entrypoints.worker.container import WorkerContainer
from vilaserve.entrypoints.worker.settings import WorkerSettings

LONG = {"prompt": "USER: a b c ASSISTANT:", "max_new_tokens": 500, "echo": False}
BUSY = "the worker is busy: 2 requests running and 2 waiting (limit 4); retry later"


def worker(runner: FakeModelRunner, vision: FakeVisionEncoder, **flags: int) -> WorkerContainer:
    settings = WorkerSettings(
        model_path="/models/VILA1.5-3b", register_with_controller=False, log_format="text", **flags
    )
    container = WorkerContainer(settings=settings)
    runtime = SimpleNamespace(model_runner=runner, vision_encoder=vision)
    container.runtime.override(providers.Object(runtime))
    container.controller_client.override(providers.Object(FakeController()))
    return container


def figures(client: TestClient, container: WorkerContainer) -> dict[str, float]:
    """What each reader says: the status, a heartbeat, and the engine's gauges on /metrics."""
    status = client.post("/worker_get_status").json()["queue_length"]
    metrics = client.get("/metrics").text

    def gauge(name: str) -> float:
        found = re.search(rf"^vllm:{name} (\S+)$", metrics, re.MULTILINE)
        assert found, name
        return float(found.group(1))

    return {
        "status": status,
        "running": gauge("num_requests_running"),
        "waiting": gauge("num_requests_waiting"),
        "kv": gauge("kv_cache_usage_perc"),
    }


async def heartbeat_length(container: WorkerContainer) -> int:
    await container.heartbeat().beat_once()
    controller = container.controller_client()
    assert isinstance(controller, FakeController)
    return controller.heartbeats[-1][1]


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.002)):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("timed out")


async def last(chunks: AsyncIterator[StreamChunk]) -> StreamChunk:
    final = StreamChunk(text="")
    async for final in chunks:  # noqa: B007 - the final chunk is the result
        pass
    return final


def test_status_heartbeat_and_metrics_agree_while_requests_run_wait_and_encode() -> None:
    """Two running, one encoding its picture and one waiting for its turn: four in the queue
    for every reader; a fifth is refused at once; every way out brings all back to 0.
    (Before, the status counted the picture's request but /metrics did not, and a request
    queued in the engine was 'running' for the status but 'waiting' for /metrics.)"""
    gate = threading.Event()
    runner = FakeModelRunner(cache_rows=4, delay_s=0.002)
    vision = FakeVisionEncoder(gate)
    # Three served at once (two in the batch, one encoding), one more may wait.
    container = worker(
        runner, vision, limit_model_concurrency=3, max_num_seqs=2, max_queue_length=1
    )
    with TestClient(create_worker_app(container)) as client:
        generate = container.generate_stream()

        async def scenario() -> None:
            running = [generate.stream(generate.prepare(LONG)) for _ in range(2)]
            for stream in running:
                assert (await anext(stream)).error_code == 0  # both in the batch
            body = {"prompt": "<image> q", "images": [FAKE_PNG_B64], "max_new_tokens": 3}
            picture_end = asyncio.ensure_future(last(generate.stream(generate.prepare(body))))
            await until(lambda: vision.encoding == 1)
            queued = generate.stream(generate.prepare(LONG))
            queued_end = asyncio.ensure_future(last(queued))
            engine = container.text_generator().engine
            await until(lambda: engine.admission.queue_length == 4)
            assert not engine.scheduler.waiting  # the fourth waits for its turn, outside
            # HTTP answers on the test client's own loop: this one (and the engine) waits.
            assert figures(client, container) == {
                "status": 4, "running": 2, "waiting": 2, "kv": 0.5,
            }  # fmt: skip
            assert await heartbeat_length(container) == 4

            refused = client.post("/worker_generate_stream", json=LONG)
            assert refused.status_code == 429
            frame = json.loads(refused.content.rstrip(b"\0"))
            assert (frame["error_code"], frame["text"]) == (ErrorCode.ENGINE_OVERLOADED, BUSY)
            assert client.post("/worker_generate", json=LONG).status_code == 429
            assert figures(client, container)["status"] == 4  # the refused never counted

            await running[0].aclose()  # a client that went away: the fourth gets its turn
            await until(lambda: engine.admission.running == 2 and engine.admission.waiting == 1)
            assert figures(client, container) == {
                "status": 3, "running": 2, "waiting": 1, "kv": 0.5,
            }  # fmt: skip
            runner.fail_next = OutOfDeviceMemory("the device ran out of memory")
            failed = [await last(running[1]), await queued_end]  # one failed step, both out
            assert {c.error_code for c in failed} == {OutOfDeviceMemory.code}
            gate.set()  # the picture is encoded at last, and its request runs to its end
            assert (await picture_end).finish_reason == "length"
            await until(lambda: engine.admission.queue_length == 0)
            assert figures(client, container) == {"status": 0, "running": 0, "waiting": 0, "kv": 0}
            assert await heartbeat_length(container) == 0

        asyncio.run(scenario())


def test_a_request_waiting_for_its_turn_has_nothing_encoded() -> None:
    """Beyond --limit-model-concurrency requests wait before any work: a burst of pictures
    neither holds every request's features nor stalls the running streams with encodes."""
    container = worker(
        FakeModelRunner(cache_rows=2, delay_s=0.002), FakeVisionEncoder(), limit_model_concurrency=1
    )
    vision = container.vision_encoder()
    with TestClient(create_worker_app(container)):
        generate = container.generate_stream()

        async def scenario() -> None:
            first = generate.stream(generate.prepare({**LONG, "max_new_tokens": 40}))
            assert (await anext(first)).error_code == 0
            body = {"prompt": "<image> q", "images": [FAKE_PNG_B64], "max_new_tokens": 2}
            second = asyncio.ensure_future(last(generate.stream(generate.prepare(body))))
            await asyncio.sleep(0.05)
            assert vision.encoded == [] and not second.done()  # waiting for its turn
            await last(first)
            assert (await second).finish_reason == "length"
            assert len(vision.encoded) == 1

        asyncio.run(scenario())


def test_refused_prompts_and_pictures_leave_the_queue() -> None:
    container = worker(FakeModelRunner(cache_rows=2, length=64), FakeVisionEncoder())
    with TestClient(create_worker_app(container)) as client:
        refusals = [
            {"prompt": ""},  # refused by the scheduler, inside the engine
            {"prompt": " ".join(["w"] * 100)},  # refused by the tokenizer: longer than 64
            {"prompt": "<image> q", "images": ["bm90IGEgcG5n"]},  # not a picture
        ]
        for body in refusals:
            response = client.post("/worker_generate_stream", json=body)
            assert response.status_code == 400, body
            assert figures(client, container) == {
                "status": 0, "running": 0, "waiting": 0, "kv": 0,
            }  # fmt: skip
        served = client.post("/worker_generate", json={"prompt": "q", "max_new_tokens": 2})
        assert served.json()["error_code"] == 0
        assert figures(client, container)["status"] == 0


def test_the_flags_keep_their_meaning() -> None:
    settings = WorkerSettings(
        model_path="/m", limit_model_concurrency=4, max_queue_length=3, max_num_seqs=16
    )
    assert settings.running_sequences == 4  # never more than the limit run at once
    assert settings.max_requests == 4 + 3  # the limit, plus the queue beyond it
    assert settings.cache_rows == 32  # --max-num-seqs as given still sizes the cache
    smaller = WorkerSettings(model_path="/m", limit_model_concurrency=4, max_num_seqs=2)
    assert (smaller.running_sequences, smaller.max_requests) == (2, 4 + 64)


def test_a_ticket_leaves_exactly_once_and_never_before_its_sequence() -> None:
    heard: list[tuple[int, int]] = []
    admission = Admission(max_requests=2, listener=lambda r, w: heard.append((r, w)))
    first, second = admission.admit(), admission.admit()
    with pytest.raises(EngineOverloaded, match=r"0 requests running and 2 waiting \(limit 2\)"):
        admission.admit()
    first.submitted()
    first.started()
    first.leave()  # its client went away: the engine still holds the sequence
    assert (admission.running, admission.waiting) == (1, 1)
    first.ended()
    first.ended()
    first.leave()
    second.leave()
    second.leave()
    assert (admission.running, admission.waiting) == (0, 0)
    assert heard == [(0, 1), (0, 2), (1, 1), (0, 1), (0, 0)]
    with pytest.raises(ValueError, match="another generator"):
        Admission().claim(first)
