"""SIGTERM on a worker: the controller forgets it at once, its in-flight stream either
finishes or, past --drain-timeout-s, ends with an error chunk; the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from servers import free_port, start_controller, worker_process

pytestmark = pytest.mark.subprocess


def test_sigterm_leaves_the_controller_and_drains_the_stream(tiny_vila_siglip: Path) -> None:
    with start_controller() as control:
        port = free_port()
        worker = worker_process(
            tiny_vila_siglip,
            port,
            "--controller-address", control.url,
            "--worker-address", f"http://127.0.0.1:{port}",
            "--heartbeat-interval-s", "0.5",
            "--drain-timeout-s", "1",
        )  # fmt: skip
        with worker:
            deadline = time.monotonic() + 30
            while not httpx.post(control.url + "/list_models").json()["models"]:
                assert time.monotonic() < deadline, worker.log
                time.sleep(0.1)
            frames: list[dict] = []
            body = {
                "prompt": "USER: hi ASSISTANT:",
                "temperature": 0.9,
                "max_new_tokens": 100_000,  # far more than the drain allows
                "stop_token_ids": [-1],
            }
            started = threading.Event()

            def read() -> None:
                url = worker.url + "/worker_generate_stream"
                with httpx.stream("POST", url, json=body, timeout=60) as r:
                    for piece in r.iter_bytes():
                        started.set()
                        frames.extend(json.loads(p) for p in piece.split(b"\0") if p.strip())

            reader = threading.Thread(target=read)
            reader.start()
            assert started.wait(30)
            assert worker.process is not None
            worker.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            while httpx.post(control.url + "/list_models").json()["models"]:
                assert time.monotonic() - signalled < 2, "the controller still lists the worker"
                time.sleep(0.05)
            reader.join(30)
            assert worker.process.wait(30) == 0, worker.log
        assert frames and frames[-1]["error_code"] in (0, 50006)
