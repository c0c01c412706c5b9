"""Faults on loopback, one after another: what a client gets and how long recovery takes.

Runs the controller, a worker (the W4A16 demo model unless `--model-path`) and the API as child
processes, then: the controller down at start, a controller restart, a worker SIGKILL while a
stream runs, a worker SIGTERM while a stream runs, and a client that hangs up (streaming and
not). For each: what the client received, and the seconds until the stack served again.

    python benchmarks/faults.py

Writes benchmarks/results/faults.{json,png}.

    python benchmarks/faults.py --attacks

Issue 23's attacks instead, one after another, on `vilaserve serve` with API keys (a 0600
file) and so an internal token (see attacks.py): first a control (no request, one process
keeping a core busy for 2 s: what any burst of CPU on the host costs the users), then an
empty prompt, relay poison (a lone
surrogate and NaN to the controller's relay once a second for 30 s, without the token and with
it), a 20 MB prompt, JSON expansion (64 MB to the worker and the controller, four 32 MB API
requests at once, then four naming a picture), 1,000 connections trickling their request
heads (60 s on the API, 20 s on the worker and on the controller; then 1,500 for 20 s on the
API, beyond its connection limit), and `kill -9` of the worker. A probe user sends small chat
completions one after another throughout, each on a new connection (a new visitor: what the
connection limit meets). For each attack: what the attacking client got, the probe's latency
p50 / p99 against its baseline, requests lost, each process's peak RSS and CPU seconds,
whether the controller still lists the worker, and the seconds until served again (after the
kill: the recovery). Each attacking process builds its payloads before its window opens.
Writes benchmarks/results/faults_attacks.{json,png}.
"""

from __future__ import annotations

import argparse
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


def attack_run(model: str, port: int, nice: int = 0, only: str = "") -> None:
    from attacks import (
        Attack,
        Campaign,
        ServeStack,
        Users,
        chosen,
        highest_peaks,
        plot_campaign,
        result_stem,
    )

    def slow(service: str, seconds: int) -> Attack:
        name = f"slow headers: 1,000 connections for {seconds} s on the {service}"
        return Attack(name, "slow_headers", seconds, ("--service", service.lower()))

    attacks = [
        # The control: no request, one process busy on the host for 2 s (the floor).
        Attack("control: a busy process on the host for 2 s, no request", "busy_process", 2),
        Attack("empty prompt (API and worker, twice a second)", "empty_prompt", 15),
        Attack("relay poison (surrogate, NaN) once a second for 30 s", "relay_poison", 30),
        Attack("20 MB prompt (worker, /count_token + refresh, API)", "huge_prompt", 10),
        Attack("JSON expansion (64 MB worker, controller; 4 x 32 MB API)", "json_expansion", 1),
        slow("API", 60),
        slow("worker", 20),
        slow("controller", 20),
        # Beyond the API's connection limit (1,024): who is still served?
        Attack(
            "slow headers: 1,500 connections for 20 s on the API (limit 1,024)",
            "slow_headers",
            20,
            ("--service", "api", "--connections", "1500"),
        ),
        Attack("worker kill -9 under serve", "kill_worker"),
    ]
    with ServeStack(model, port) as stack:
        assert stack.target is not None
        report: dict[str, Any] = {
            "cpu": cpu_description(),
            "serve_started_s": round(stack.started_s, 1),
            "internal_token_in_children": stack.token_in_children(),
            "users": "1 probe: small chat completions (max_tokens 8), one after another, "
            "each on a new connection",
        }
        users = Users(stack.target, clients=1, mix=False, max_tokens=8, fresh_connections=True)
        report["attacker_nice"] = nice
        campaign = Campaign(stack, users, baseline_s=20, gap_s=3, after_s=15, attacker_nice=nice)
        report["windows"] = campaign.run(chosen(attacks, only), say=lambda m: print(m, flush=True))
        report["serve_said"] = stack.serve_lines()
        report["peak_rss_mb_any_window"] = highest_peaks(report["windows"])
    RESULTS.mkdir(exist_ok=True)
    stem = result_stem("faults_attacks", nice)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    title = "faults.py --attacks: one probe user during each attack on vilaserve serve"
    if nice:
        title += f" (attacker at nice {nice})"
    plot_campaign(report["windows"], title, RESULTS / f"{stem}.png")
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="default: the W4A16 demo model")
    parser.add_argument("--attacks", action="store_true", help="issue 23's attacks instead")
    parser.add_argument("--port", type=int, default=18100, help="--attacks: API port (+1, +2)")
    from attacks import add_campaign_options

    add_campaign_options(parser)
    args = parser.parse_args()
    model = args.model
    if args.attacks:
        from attacks import demo_model

        attack_run(model or demo_model(), args.port, args.attacker_nice, args.only)
        return
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
