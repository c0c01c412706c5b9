"""Registration and heartbeats of a real worker against a fake controller on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
from servers import FakeControllerApp, ServerThread, free_port
from test_worker_e2e import start_worker


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_registers_beats_and_reregisters(tiny_vila_siglip: Path) -> None:
    controller = FakeControllerApp()
    with ServerThread(controller.app) as control:
        worker_port = free_port()
        address = f"http://127.0.0.1:{worker_port}"
        with start_worker(
            tiny_vila_siglip,
            register_with_controller=True,
            controller_address=control.url,
            worker_address=address,
            port=worker_port,
            heartbeat_interval_s=0.2,
        ):
            wait_for(lambda: len(controller.registrations) == 1)
            registration = controller.registrations[0]
            assert registration["worker_name"] == address
            assert registration["check_heart_beat"] is True
            assert registration["multimodal"] is True
            assert registration["worker_status"]["model_names"] == [tiny_vila_siglip.name]
            wait_for(lambda: len(controller.heartbeats) >= 2)
            assert controller.heartbeats[-1] == {"worker_name": address, "queue_length": 0}
            controller.forget_all()  # as after a controller restart: `exist: false`
            wait_for(lambda: len(controller.registrations) == 2)


def test_waits_for_a_controller_that_is_down(tiny_vila_siglip: Path) -> None:
    controller = FakeControllerApp()
    control_port = free_port()
    with start_worker(
        tiny_vila_siglip,
        register_with_controller=True,
        controller_address=f"http://127.0.0.1:{control_port}",
        heartbeat_interval_s=0.2,
        heartbeat_retry_max_s=0.3,
    ) as worker:
        # The worker serves while the controller is unreachable.
        import httpx

        assert httpx.post(worker.url + "/worker_get_status").status_code == 200
        time.sleep(0.5)
        with ServerThread(controller.app, port=control_port):
            wait_for(lambda: len(controller.registrations) >= 1)
            wait_for(lambda: len(controller.heartbeats) >= 1)


def test_a_controller_with_a_secret_takes_only_workers_that_send_it(
    tiny_vila_siglip: Path,
) -> None:
    from servers import start_controller

    with start_controller(registration_secret="the-run-secret") as control:

        def models() -> list[str]:
            return httpx.post(control.url + "/list_models").json()["models"]

        outsider_port = free_port()
        with start_worker(
            tiny_vila_siglip,
            register_with_controller=True,
            controller_address=control.url,
            worker_address=f"http://127.0.0.1:{outsider_port}",
            port=outsider_port,
            heartbeat_interval_s=0.2,
            model_name="outsider",
        ):
            time.sleep(1.0)
            assert models() == []  # no secret: refused (401), never listed
        port = free_port()
        with start_worker(
            tiny_vila_siglip,
            register_with_controller=True,
            controller_address=control.url,
            worker_address=f"http://127.0.0.1:{port}",
            port=port,
            heartbeat_interval_s=0.2,
            registration_secret="the-run-secret",
        ):
            wait_for(lambda: models() == [tiny_vila_siglip.name])
