"""`vilaserve serve`'s parts: the child command lines, the port check, and the supervisor
(with stand-in children: plain `python -c` sleepers, no model)."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from vilaserve.entrypoints import serve
from vilaserve.entrypoints.api.settings import ApiSettings
from vilaserve.entrypoints.serve import ChildSpec, RestartCount, RestartPolicy, Supervisor


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
    args = parse("--host", "0.0.0.0", "--precision", "W4A16", "--quant-path", "/q.pt")
    specs = {spec.name: " ".join(spec.argv) for spec in serve.child_specs(args)}
    assert "--precision W4A16" in specs["worker"] and "--quant-path /q.pt" in specs["worker"]
    assert "--host 0.0.0.0" in specs["api"]
    assert "--host" not in specs["controller"] and "--host" not in specs["worker"]


def test_keys_and_the_internal_token_go_through_the_environment_never_argv() -> None:
    args = parse("--api-keys", "k1")
    specs = {s.name: s for s in serve.child_specs(args, ("k1", "k2"), internal_token="tok")}
    assert not [n for n, s in specs.items() if any("k1" in a or "tok" in a for a in s.argv)]
    assert "--api-keys" not in specs["api"].argv
    assert specs["api"].env == {
        "VILASERVE_API_API_KEYS": "k1,k2",
        "VILASERVE_INTERNAL_TOKEN": "tok",
    }
    assert specs["worker"].env == specs["controller"].env == {"VILASERVE_INTERNAL_TOKEN": "tok"}
    assert all(not s.env for s in serve.child_specs(args))  # no keys, no token: nothing added


def test_keys_come_from_the_flag_the_file_and_the_environment(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("f1\n\nf2 , f3\n")
    keys.chmod(0o600)
    args = parse("--api-keys", "a1,f1", "--api-keys-file", str(keys))
    environ = {"VILASERVE_API_KEYS": "e1", "VILASERVE_API_API_KEYS": "e2"}
    assert serve.api_keys(args, environ) == ("a1", "f1", "f2", "f3", "e2", "e1")
    assert serve.api_keys(parse(), {}) == ()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_a_keys_file_group_or_others_can_reach_is_refused(tmp_path: Path, mode: int) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    keys.chmod(mode)
    with pytest.raises(ValueError, match=f"mode 0{mode:o}.*chmod 600"):
        serve.api_keys(parse("--api-keys-file", str(keys)), {})


def test_an_empty_or_missing_keys_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.write_text("\n , \n")
    empty.chmod(0o600)
    with pytest.raises(ValueError, match="no key"):
        serve.api_keys(parse("--api-keys-file", str(empty)), {})
    with pytest.raises(ValueError, match="cannot read"):
        serve.api_keys(parse("--api-keys-file", str(tmp_path / "absent")), {})


def test_the_api_reads_its_keys_file_and_the_friendlier_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("f1,f2\n")
    keys.chmod(0o600)
    monkeypatch.setenv("VILASERVE_API_KEYS", "e1")
    assert ApiSettings().api_key_list == ("e1",)
    assert ApiSettings(api_keys="a1", api_keys_file=str(keys)).api_key_list == ("a1", "f1", "f2")
    keys.chmod(0o644)
    with pytest.raises(ValueError, match="0644"):
        ApiSettings(api_keys_file=str(keys))


def test_an_internal_token_only_with_keys_and_not_with_no_internal_token() -> None:
    assert serve.internal_token(parse(), (), {}) is None
    token = serve.internal_token(parse(), ("k1",), {})
    assert token is not None and len(token) >= 32
    assert token != serve.internal_token(parse(), ("k1",), {})  # one per run
    assert serve.internal_token(parse("--no-internal-token"), ("k1",), {}) is None
    # One given to serve is handed on (like the registration secret).
    given = {"VILASERVE_INTERNAL_TOKEN": "x"}
    assert serve.internal_token(parse(), ("k1",), given) == "x"
    assert serve.internal_token(parse(), (), given) == "x"
    assert serve.internal_token(parse("--no-internal-token"), ("k1",), given) is None


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
    death = supervisor.dead_child()
    assert death is not None and (death.name, death.code) == ("worker", -signal.SIGKILL)
    assert supervisor.dead_child() is None  # each death is told once
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


def test_restarts_back_off_exponentially_up_to_a_cap() -> None:
    count = RestartCount(RestartPolicy(limit=8, first_delay_s=1, max_delay_s=30))
    delays = [count.next_delay_s(uptime_s=0.5) for _ in range(9)]
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30, None]
    assert count.restarts == 8


def test_a_worker_that_stayed_up_long_enough_starts_the_count_again() -> None:
    count = RestartCount(RestartPolicy(limit=2, stable_after_s=60))
    assert [count.next_delay_s(uptime_s=59), count.next_delay_s(uptime_s=1)] == [1, 2]
    assert count.next_delay_s(uptime_s=5) is None  # the limit: a worker that keeps crashing
    assert count.next_delay_s(uptime_s=60) == 1 and count.restarts == 1


def test_no_restarts_with_a_limit_of_zero() -> None:
    assert RestartCount(RestartPolicy(limit=0)).next_delay_s(uptime_s=1000) is None


def test_worker_restarts_flag() -> None:
    assert parse().worker_restarts == 5
    assert serve.restart_policy(parse("--worker-restarts", "0")).limit == 0
    with pytest.raises(SystemExit):
        parse("--worker-restarts", "-1")


class StubStack:
    """What the watch loop asks of the running stack, without HTTP."""

    def __init__(self, serving_after_s: float = 0.0) -> None:
        self.forgotten = 0
        self._serving_after_s = serving_after_s
        self._since: float | None = None

    def forget_worker(self) -> None:
        self.forgotten += 1
        self._since = time.monotonic()

    def worker_serving(self) -> bool:
        return self._since is not None and time.monotonic() - self._since >= self._serving_after_s


class Interrupts:
    def __init__(self) -> None:
        self.count = 0


def crasher(name: str, code: int) -> ChildSpec:
    return ChildSpec(name, (sys.executable, "-c", f"import sys; sys.exit({code})"))


def test_the_watch_restarts_the_worker_then_gives_up_at_the_limit() -> None:
    said: list[str] = []
    supervisor = Supervisor(stop_timeout_s=5, say=said.append)
    worker = crasher("worker", 3)
    for spec in (sleeper("controller"), worker, sleeper("api")):
        supervisor.start(spec)
    controller, _, api = supervisor.processes
    policy = RestartPolicy(limit=2, first_delay_s=0.1, max_delay_s=0.2)
    stack = StubStack(serving_after_s=60)
    try:
        code = serve.watch(
            supervisor, worker, RestartCount(policy), stack, Interrupts(), said.append
        )
    finally:
        supervisor.stop(lambda: 0)
    assert code == 1
    events = [line for line in said if not line.startswith("started controller")]
    assert [line for line in events if "worker" in line and "started" not in line] == [
        "the worker exited with code 3; restarting in 0.1 s (restart 1 of 2)",
        "the worker exited with code 3; restarting in 0.2 s (restart 2 of 2)",
        "the worker exited with code 3 after 2 restarts (--worker-restarts); stopping the others",
    ]
    assert len([line for line in said if line.startswith("started worker")]) == 3
    assert stack.forgotten == 2  # told at each restart
    assert controller.returncode == -signal.SIGTERM and api.returncode == -signal.SIGTERM


def test_the_watch_says_when_the_restarted_worker_serves_and_stops_if_the_api_dies() -> None:
    said: list[str] = []
    supervisor = Supervisor(stop_timeout_s=5, say=said.append)
    worker = sleeper("worker")
    for spec in (sleeper("controller"), worker, sleeper("api")):
        supervisor.start(spec)
    controller, first_worker, api = supervisor.processes
    first_worker.kill()
    policy = RestartPolicy(limit=5, first_delay_s=0.1)
    loop_result: list[int] = []

    def kill_api_once_served() -> None:
        deadline = time.monotonic() + 20
        while "the worker is serving again" not in said and time.monotonic() < deadline:
            time.sleep(0.05)
        api.kill()

    threading.Thread(target=kill_api_once_served, daemon=True).start()
    try:
        loop_result.append(
            serve.watch(
                supervisor, worker, RestartCount(policy), StubStack(), Interrupts(), said.append
            )
        )
    finally:
        supervisor.stop(lambda: 0)
    assert loop_result == [1]
    assert said[3:] == [
        "the worker was killed by SIGKILL; restarting in 0.1 s (restart 1 of 5)",
        f"started worker (pid {supervisor.processes[1].pid})",
        "the worker is serving again",
        "the api was killed by SIGKILL unexpectedly; stopping the others",
    ]
    assert supervisor.processes[1].returncode == -signal.SIGTERM  # the restarted one, stopped
    assert controller.returncode == -signal.SIGTERM


def test_the_watch_ends_with_0_at_an_interrupt() -> None:
    supervisor = Supervisor(stop_timeout_s=5, say=lambda _: None)
    worker = sleeper("worker")
    supervisor.start(worker)
    interrupts = Interrupts()
    interrupts.count = 1
    try:
        code = serve.watch(
            supervisor, worker, RestartCount(RestartPolicy()), StubStack(), interrupts, print
        )
    finally:
        supervisor.stop(lambda: 0)
    assert code == 0
