"""`vilaserve serve`'s parts: the child command lines, the port check, and the supervisor
(with stand-in children: plain `python -c` sleepers, no model)."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time

import pytest

from vilaserve.entrypoints import serve
from vilaserve.entrypoints.serve import ChildSpec, Supervisor


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_serve_arguments(parser)
    return parser.parse_args(["--model-path", "/models/VILA1.5-3b", *argv])


def test_children_are_controller_worker_api_wired_to_each_other() -> None:
    args = parse("--controller-port", "1", "--worker-port", "2", "--api-port", "3")
    specs = {spec.name: spec.argv for spec in serve.child_specs(args)}
    assert list(specs) == ["controller", "worker", "api"]
    assert specs["controller"][3:6] == ("controller", "--port", "1")
    worker = " ".join(specs["worker"])
    assert "worker --model-path /models/VILA1.5-3b" in worker
    assert "--controller-address http://127.0.0.1:1" in worker
    assert "--worker-address http://127.0.0.1:2 --port 2" in worker
    assert "--quant-path" not in worker and "--precision" not in worker  # the worker decides
    api = " ".join(specs["api"])
    assert "api --controller-address http://127.0.0.1:1 --host 127.0.0.1 --port 3" in api
    assert all(
        spec[:3] == (sys.executable, "-m", "vilaserve.entrypoints.cli") for spec in specs.values()
    )


def test_worker_options_pass_through_and_only_the_api_takes_the_host() -> None:
    args = parse(
        "--host", "0.0.0.0", "--precision", "W4A16", "--quant-path", "/q.pt", "--api-keys", "k1"
    )
    specs = {spec.name: " ".join(spec.argv) for spec in serve.child_specs(args)}
    assert "--precision W4A16" in specs["worker"] and "--quant-path /q.pt" in specs["worker"]
    assert "--host 0.0.0.0" in specs["api"] and "--api-keys k1" in specs["api"]
    assert "--host" not in specs["controller"] and "--host" not in specs["worker"]


def test_no_api_leaves_the_api_out() -> None:
    assert [s.name for s in serve.child_specs(parse("--no-api"))] == ["controller", "worker"]


def test_a_port_in_use_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = serve.run_serve(parse("--controller-port", str(port)))
    assert code == 1
    out = capsys.readouterr().out
    assert f"port {port} on 127.0.0.1 is already in use" in out and "--controller-port" in out
    assert "started" not in out


def sleeper(name: str, *, ignore_sigterm: bool = False) -> ChildSpec:
    code = "import signal, time\n"
    if ignore_sigterm:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "time.sleep(60)\n"
    return ChildSpec(name, (sys.executable, "-c", code))


def test_supervisor_reports_a_dead_child_and_stops_the_rest() -> None:
    said: list[str] = []
    supervisor = Supervisor(stop_timeout_s=5, say=said.append)
    for name in ("controller", "worker", "api"):
        supervisor.start(sleeper(name))
    assert supervisor.dead_child() is None
    controller, worker, api = supervisor.processes
    worker.kill()
    worker.wait()
    assert supervisor.dead_child() == ("worker", -signal.SIGKILL)
    supervisor.stop(lambda: 0)
    assert controller.returncode == -signal.SIGTERM and api.returncode == -signal.SIGTERM
    assert said[:3] == [
        f"started {n} (pid {p.pid})"
        for n, p in zip(("controller", "worker", "api"), (controller, worker, api), strict=True)
    ]


def test_supervisor_kills_a_child_that_ignores_sigterm() -> None:
    said: list[str] = []
    supervisor = Supervisor(stop_timeout_s=0.5, say=said.append)
    supervisor.start(sleeper("worker", ignore_sigterm=True))
    time.sleep(0.3)  # let it install its handler
    started = time.monotonic()
    supervisor.stop(lambda: 0)
    assert supervisor.processes[0].returncode == -signal.SIGKILL
    assert time.monotonic() - started < 5
    assert any("did not stop; killing it" in line for line in said)


def test_a_second_interrupt_kills_at_once() -> None:
    supervisor = Supervisor(stop_timeout_s=60, say=lambda _: None)
    supervisor.start(sleeper("worker", ignore_sigterm=True))
    time.sleep(0.3)
    interrupts = iter([1, 1, 2])  # the user presses Ctrl-C again while serve waits
    started = time.monotonic()
    supervisor.stop(lambda: next(interrupts, 2))
    assert supervisor.processes[0].returncode == -signal.SIGKILL
    assert time.monotonic() - started < 5
