"""The worker as a Ray Serve replica (adapters/worker/ray_replica.py), built from the worker's
own container with fake adapters: the same frames as the worker's HTTP route, and a health
check that asks the model thread. No Ray needed."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from fakes import FAKE_PNG_B64
from fastapi.testclient import TestClient

from vilaserve.adapters.worker.ray_replica import (
    EngineNotAlive,
    ReplicaServices,
    WorkerReplica,
)
from vilaserve.entrypoints.worker.container import WorkerContainer


class ThreadRunner:
    """A model thread that runs what is submitted (or, `stuck`, never does)."""

    def __init__(self, stuck: bool = False) -> None:
        self.stuck = stuck

    def submit(self, work: Callable[[], None]) -> None:
        if not self.stuck:
            threading.Thread(target=work).start()


def services(container: WorkerContainer, runner: Any) -> ReplicaServices:
    return ReplicaServices(
        generate=container.generate_stream(),
        describe=container.describe_model(),
        report_status=container.report_status(),
        generator=container.text_generator(),
        runner=runner,
        render_metrics=lambda: "vllm:generation_tokens_total 0.0\n",
    )


def replica(container: WorkerContainer, runner: Any = None, **options: Any) -> WorkerReplica:
    return WorkerReplica(services, container, runner or ThreadRunner(), **options)


def replica_bytes(replica: WorkerReplica, body: dict[str, Any]) -> bytes:
    async def run() -> bytes:
        encoded = json.dumps(body).encode()
        return b"".join([f async for f in replica.generate_stream(encoded, affinity_key="k")])

    return asyncio.run(run())


BODIES = [
    {  # served
        "prompt": "A chat. USER: <image>\nWhat is this? ASSISTANT:",
        "images": [FAKE_PNG_B64],
        "max_new_tokens": 16,
        "temperature": 0,
    },
    {"prompt": "q", "max_new_tokens": 2, "echo": False},  # stopped by length
    {"prompt": "<image><image>", "images": [FAKE_PNG_B64]},  # refused: placeholders
    {"prompt": "x", "max_new_tokens": -1},  # refused: parameters
    {"prompt": "<image>", "images": ["%%%"]},  # refused: not base64
]


@pytest.mark.parametrize("body", BODIES)
def test_the_frames_are_the_worker_routes_bytes(
    body: dict[str, Any], container: WorkerContainer, client: TestClient
) -> None:
    with client.stream("POST", "/worker_generate_stream", json=body) as response:
        over_http = b"".join(response.iter_bytes())
    assert replica_bytes(replica(container), body) == over_http


def test_status_details_and_template_are_the_worker_routes(
    container: WorkerContainer, client: TestClient
) -> None:
    r = replica(container)
    assert asyncio.run(r.get_status()) == client.post("/worker_get_status").json()
    assert asyncio.run(r.model_details()) == client.post("/model_details", json={}).json()
    template = client.post("/worker_get_conv_template", json={}).json()
    assert asyncio.run(r.conversation_template()) == template
    assert "generation_tokens" in asyncio.run(r.metrics())


def test_the_health_check_asks_the_model_thread(container: WorkerContainer) -> None:
    asyncio.run(replica(container).check_health())  # answers: healthy
    stuck = replica(container, ThreadRunner(stuck=True), liveness_timeout_s=0.05)
    stuck._probe._stuck_after_s = 0.0
    with pytest.raises(EngineNotAlive, match="did not answer"):
        asyncio.run(stuck.check_health())


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class HeldRunner:
    """A model thread busy with one long step: what is submitted runs only when released."""

    def __init__(self) -> None:
        self.queued: list[Callable[[], None]] = []

    def submit(self, work: Callable[[], None]) -> None:
        self.queued.append(work)

    def release(self) -> None:
        for work in self.queued:
            threading.Thread(target=work).start()
        self.queued.clear()


class ClosedRunner:
    def submit(self, work: Callable[[], None]) -> None:
        raise RuntimeError("cannot schedule new futures after shutdown")


def test_a_busy_engine_passes_its_checks_until_it_has_been_stuck_too_long() -> None:
    """A 35 s prefill (a 3B model's picture on one core) is busy, not dead: the checks during it
    pass and send no second probe; only a probe unanswered past `stuck_after_s` fails one."""
    from vilaserve.adapters.worker.ray_replica import LivenessProbe

    async def scenario() -> None:
        runner, clock = HeldRunner(), _Clock()
        probe = LivenessProbe(runner, timeout_s=0.01, stuck_after_s=300.0, clock=clock)
        for clock.now in (0.0, 10.0, 20.0, 30.0):
            await probe.check()  # busy: passes
        assert len(runner.queued) == 1  # one probe waits behind the step, not four
        runner.release()
        clock.now = 40.0
        await probe.check()  # answered: passes, and the next check sends a new probe
        await probe.check()
        assert len(runner.queued) == 1
        clock.now = 341.0
        with pytest.raises(EngineNotAlive, match="did not answer for 301 s"):
            await probe.check()
        closed = LivenessProbe(ClosedRunner(), 0.01, 300.0, clock=clock)
        with pytest.raises(EngineNotAlive, match="gone"):
            await closed.check()

    asyncio.run(scenario())


def test_a_cancelled_call_ends_the_generation(container: WorkerContainer, generator) -> None:
    generator.delay_s = 0.05
    generator.reply = tuple(f" w{i}" for i in range(100))
    r = replica(container)

    async def run() -> None:
        frames = r.generate_stream(json.dumps({"prompt": "q", "max_new_tokens": 100}).encode())
        await anext(frames)
        task = asyncio.ensure_future(anext(frames))
        await asyncio.sleep(0.01)
        task.cancel()  # what Ray Serve does when the caller cancels
        with pytest.raises(asyncio.CancelledError):
            await task
        await frames.aclose()

    asyncio.run(run())
    assert generator.closed == 1 and generator.queue_length == 0
