"""Registration and heartbeats against a fake controller, with a virtual clock."""

from __future__ import annotations

import asyncio

import pytest
from fakes import FakeController, FakeTextGenerator

from vilaserve.application.worker.heartbeat import Heartbeat, HeartbeatPolicy, Register
from vilaserve.application.worker.report_status import ReportStatus


class VirtualClock:
    """An injected `sleep` that records delays and lets a test act between them."""

    def __init__(self, controller: FakeController, script: dict[int, dict[str, bool]]) -> None:
        self.delays: list[float] = []
        self._controller = controller
        self._script = script

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        for key, value in self._script.get(len(self.delays), {}).items():
            setattr(self._controller, key, value)
        if len(self.delays) > 12:
            raise asyncio.CancelledError
        await asyncio.sleep(0)


def make(controller: FakeController, clock: VirtualClock) -> Heartbeat:
    status = ReportStatus(["m"], FakeTextGenerator())
    register = Register(controller, "http://w:1", status, multimodal=True)
    policy = HeartbeatPolicy(interval_s=15.0, retry_min_s=1.0, retry_max_s=4.0)
    return Heartbeat(controller, register, status, "http://w:1", policy, clock.sleep)


def run(heartbeat: Heartbeat) -> None:
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(heartbeat.run())


def test_registers_then_beats_at_the_interval() -> None:
    controller = FakeController()
    clock = VirtualClock(controller, {})
    run(make(controller, clock))
    address, status, multimodal = controller.registrations[0]
    assert (address, status.model_names, multimodal) == ("http://w:1", ("m",), True)
    assert len(controller.registrations) == 1
    assert controller.heartbeats[0] == ("http://w:1", 0)
    assert set(clock.delays) == {15.0}


def test_retries_with_backoff_while_the_controller_is_down() -> None:
    controller = FakeController(down=True)
    clock = VirtualClock(controller, {4: {"down": False}})
    run(make(controller, clock))
    assert clock.delays[:5] == [1.0, 2.0, 4.0, 4.0, 15.0]  # capped back-off, then normal beats
    assert len(controller.registrations) == 1


def test_reregisters_when_the_controller_forgot_the_worker() -> None:
    controller = FakeController()
    clock = VirtualClock(controller, {2: {"known": False}})
    run(make(controller, clock))
    assert len(controller.registrations) == 2


def test_heartbeats_survive_a_controller_outage() -> None:
    controller = FakeController()
    clock = VirtualClock(controller, {2: {"down": True}, 5: {"down": False, "known": False}})
    run(make(controller, clock))
    assert clock.delays[2:5] == [1.0, 2.0, 4.0]
    assert len(controller.registrations) == 2  # re-registered once the controller came back


def test_heartbeats_carry_the_generators_admission_queue() -> None:
    controller = FakeController()
    generator = FakeTextGenerator()
    status = ReportStatus(["m"], generator)
    register = Register(controller, "http://w:1", status, multimodal=True)
    heartbeat = Heartbeat(controller, register, status, "http://w:1", HeartbeatPolicy())
    first, second = generator.admit(), generator.admit()  # e.g. encoding their pictures
    asyncio.run(heartbeat.beat_once())
    first.leave()
    asyncio.run(heartbeat.beat_once())
    second.leave()
    asyncio.run(heartbeat.beat_once())
    assert [length for _, length in controller.heartbeats] == [2, 1, 0]
