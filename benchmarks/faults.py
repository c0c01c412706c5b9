"""Faults on loopback, one after another: what a client gets and how long recovery takes.

Runs the controller, a worker (the W4A16 demo model unless `--model-path`) and the API as child
processes, then: the controller down at start, a controller restart, a worker SIGKILL while a
stream runs, a worker SIGTERM while a stream runs, and a client that hangs up (streaming and
not). For each: what the client received, and the seconds until the stack served again.

    python benchmarks/faults.py

Writes benchmarks/results/faults.{json,png}.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from serve_load import cpu_description

RESULTS = Path(__file__).resolve().parent / "results"
LOGS = Path(tempfile.gettempdir()) / "vilaserve-faults"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    def __init__(self, model: str) -> None:
        self.model = model
        self.ports = {name: free_port() for name in ("controller", "worker", "api")}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        LOGS.mkdir(exist_ok=True)
        os.environ.setdefault("VILASERVE_REGISTRATION_SECRET", "faults-run")
        os.environ["VILASERVE_API_WORKER_ADDRESS_TTL_S"] = "0"  # ask the controller each time

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self, name: str) -> None:
        port = str(self.ports[name])
        args = {
            "controller": ["controller", "--port", port],
            "worker": ["worker", "--model-path", self.model, "--precision", "W4A16",
                       "--port", port, "--controller-address", self.url("controller"),
                       "--worker-address", self.url("worker"), "--heartbeat-interval-s", "1",
                       "--drain-timeout-s", "2"],
            "api": ["api", "--port", port, "--controller-address", self.url("controller")],
        }[name]  # fmt: skip
        log = (LOGS / f"{name}.log").open("a")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "vilaserve.entrypoints.cli", *args, "--log-format", "text"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int | None:
        process = self.procs.pop(name)
        process.send_signal(sig)
        try:
            return process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            return None

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def until(condition: Callable[[], bool], timeout: float = 120.0) -> float:
    """Seconds until `condition()` holds (errors count as not yet); inf if it never does."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if condition():
                return time.monotonic() - started
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.1)
    return float("inf")


def served(stack: Stack) -> bool:
    body = {"model": model_name(stack), "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4}  # fmt: skip
    return httpx.post(stack.url("api") + "/v1/chat/completions", json=body, timeout=30).is_success


def model_name(stack: Stack) -> str:
    return str(httpx.get(stack.url("api") + "/v1/models", timeout=5).json()["data"][0]["id"])


def stream_in_background(stack: Stack, out: dict[str, Any]) -> threading.Thread:
    """A long streamed chat completion; `out` gets the events seen and the final outcome."""
    body = {"model": model_name(stack), "stream": True, "max_tokens": 2000, "temperature": 0.9,
            "messages": [{"role": "user", "content": "Tell me a very long story."}]}  # fmt: skip
    out["events"] = 0

    def run() -> None:
        try:
            url = stack.url("api") + "/v1/chat/completions"
            with httpx.stream("POST", url, json=body, timeout=120) as r:
                out["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        out["events"] += 1
                        if line != "data: [DONE]":
                            out["last"] = line[6:][:300]
        except httpx.HTTPError as exc:
            out["error"] = type(exc).__name__
        out["ended_at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    until(lambda: out["events"] > 3, 60)
    return thread


def worker_running(stack: Stack) -> float:
    text = httpx.get(stack.url("worker") + "/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))  # fmt: skip


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else None
    if model is None:
        from vilaserve.entrypoints.offline.demo import build_demo

        model = str(build_demo("awq"))
    stack = Stack(model)
    report: dict[str, Any] = {"cpu": cpu_description(), "scenarios": {}}
    scenarios = report["scenarios"]
    try:
        # 1. The controller is down when the worker and the API start.
        stack.start("worker")
        stack.start("api")
        time.sleep(3)
        stack.start("controller")
        scenarios["controller down at start"] = {
            "recovery_s": round(until(lambda: served(stack), 300), 2),
        }
        # 2. The controller restarts.
        stack.stop("controller")
        stack.start("controller")
        scenarios["controller restart"] = {"recovery_s": round(until(lambda: served(stack)), 2)}
        # 3. A worker is killed while a stream runs.
        out: dict[str, Any] = {}
        thread = stream_in_background(stack, out)
        killed = time.monotonic()
        stack.stop("worker", signal.SIGKILL)
        thread.join(60)
        client_got = out.get("last") or out.get("error")
        stack.start("worker")
        scenarios["worker SIGKILL mid-stream"] = {
            "client_got": client_got,
            "client_answered_after_s": round(out.get("ended_at", float("inf")) - killed, 2),
            "recovery_s": round(until(lambda: served(stack), 300), 2),
        }
        # 4. A worker gets SIGTERM while a stream runs (drain: 2 s).
        out = {}
        thread = stream_in_background(stack, out)
        signalled = time.monotonic()
        stack.procs["worker"].send_signal(signal.SIGTERM)
        listed = until(lambda: not httpx.post(stack.url("controller") + "/list_models").json()[
            "models"], 30)  # fmt: skip
        exit_code = stack.stop("worker", signal.SIGTERM)
        thread.join(60)
        stack.start("worker")
        scenarios["worker SIGTERM mid-stream"] = {
            "client_got": out.get("last") or out.get("error"),
            "client_answered_after_s": round(out.get("ended_at", float("inf")) - signalled, 2),
            "worker_exit_code": exit_code,
            "controller_forgot_after_s": round(listed, 2),
            "recovery_s": round(until(lambda: served(stack), 300), 2),
        }
        # 5. Clients that hang up, streaming and not.
        for streamed in (True, False):
            message = {"role": "user", "content": "A long tale."}
            body = {"model": model_name(stack), "stream": streamed, "max_tokens": 2000,
                    "temperature": 0.9, "messages": [message]}  # fmt: skip
            gone = time.monotonic()
            try:
                httpx.post(stack.url("api") + "/v1/chat/completions", json=body, timeout=1.0)
            except httpx.TimeoutException:
                gone = time.monotonic()
            freed = until(lambda: worker_running(stack) == 0, 30)
            scenarios[f"client disconnect ({'stream' if streamed else 'no stream'})"] = {
                "slot_freed_after_s": round(freed, 2),
                "served_after": served(stack),
                "since_hang_up_s": round(time.monotonic() - gone, 2),
            }
    finally:
        stack.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(report, indent=2) + "\n")
    names = list(scenarios)
    values = [min(scenarios[n].get("recovery_s", scenarios[n].get("slot_freed_after_s", 0)), 120)
              for n in names]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(names, values)
    ax.set(xlabel="seconds until served again / slot freed")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "faults.png", dpi=110)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
