"""`vilaserve serve` as a user runs it: a real command in a child process on a tiny checkpoint.

Marked `subprocess`: it starts three Python processes (one imports torch), ~10-30 s in all.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from servers import free_port

pytestmark = pytest.mark.subprocess


class ServeProcess:
    """`vilaserve serve ...` with its stdout read line by line in the background."""

    def __init__(self, *args: str, env: Mapping[str, str] | None = None) -> None:
        # The children's logs (serve's stderr); closed in close().
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vilaserve.entrypoints.cli", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))

    def wait_for_line(self, pattern: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None and self._queue.empty():
                    break
                continue
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}; got {self.lines}\n{self.log()}")

    def child_pids(self) -> dict[str, int]:
        found = (re.search(r"started (\w+) \(pid (\d+)\)", line) for line in self.lines)
        return {m.group(1): int(m.group(2)) for m in found if m}

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-3000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


@contextmanager
def serve(*args: str, env: Mapping[str, str] | None = None) -> Iterator[ServeProcess]:
    """`vilaserve serve *args`, with `env` added to this process's environment."""
    process = ServeProcess(*args, env=env)
    try:
        yield process
    finally:
        process.close()


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped has stopped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "(zombie)" not in status


def ports() -> list[str]:
    return [str(free_port()) for _ in range(3)]


def test_serve_prints_the_chat_url_and_stops_cleanly_on_ctrl_c(tiny_vila_siglip: Path) -> None:
    api, controller, worker = ports()
    flags = ["--api-port", api, "--controller-port", controller, "--worker-port", worker]
    with serve("--model-path", str(tiny_vila_siglip), "--dtype", "float32", *flags) as stack:
        chat = stack.wait_for_line(r"^Chat: ")
        assert chat == f"Chat: http://127.0.0.1:{api}/"
        assert f"Model: {tiny_vila_siglip.name}" in stack.lines
        pids = stack.child_pids()
        assert sorted(pids) == ["api", "controller", "worker"]
        # The stack answers: the API lists the model the worker registered with the controller.
        listed = httpx.post(f"http://127.0.0.1:{controller}/list_models").json()
        assert listed == {"models": [tiny_vila_siglip.name]}
        models = httpx.get(f"http://127.0.0.1:{api}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == [tiny_vila_siglip.name]
        # Its controller takes registrations only with this run's secret (which the worker got).
        intruder = {"worker_name": "http://127.0.0.1:9", "worker_status": {"model_names": ["x"]}}
        refused = httpx.post(f"http://127.0.0.1:{controller}/register_worker", json=intruder)
        assert refused.status_code == 401

        stack.process.send_signal(signal.SIGINT)
        assert stack.process.wait(timeout=60) == 0, stack.log()
        stack.wait_for_line(r"stopped$", timeout=5)
        assert not [name for name, pid in pids.items() if alive(pid)]


def test_serve_stops_the_others_and_fails_when_a_child_dies(tiny_vila_siglip: Path) -> None:
    api, controller, worker = ports()
    flags = ["--api-port", api, "--controller-port", controller, "--worker-port", worker]
    with serve("--model-path", str(tiny_vila_siglip), *flags) as stack:
        stack.wait_for_line(r"started api")
        pids = stack.child_pids()
        os.kill(pids["controller"], signal.SIGKILL)
        died = stack.wait_for_line(r"killed by")
        expected = "the controller was killed by SIGKILL while starting (see its log above)"
        assert died == f"vilaserve serve: {expected}"
        assert stack.process.wait(timeout=60) == 1
        assert not [name for name, pid in pids.items() if alive(pid)]
