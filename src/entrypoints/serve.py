"""`vilaserve serve`: controller, model worker and API on one machine, from one command.

Each piece runs as a child process of its own (the same `vilaserve` subcommands one would start
by hand). This process only supervises: it waits until the stack answers, prints the chat URL,
and on Ctrl-C / SIGTERM, or when any child dies, stops all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import httpx

LOOPBACK = "127.0.0.1"
POLL_S = 0.2


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model-path", required=True, help="VILA checkpoint directory")
    add("--model-name", help="name to serve under (default: derived from the path)")
    add("--quant-path", help="AWQ checkpoint of the LLM (W4A16)")
    add("--vision-tower", help="LLaVA-1.5: local folder of the vision tower its config names")
    add("--precision", choices=["W16A16", "W4A16"], help="weights: 16-bit or 4-bit AWQ")
    add("--device", choices=["auto", "cpu", "cuda"], help="where to run (default auto)")
    add("--dtype", choices=["auto", "bfloat16", "float16", "float32"], help="compute dtype")
    add("--conv-template", help="override the conversation template")
    add(
        "--host",
        default=LOOPBACK,
        help="address the API and web chat bind to (default 127.0.0.1; 0.0.0.0 for all). "
        "The controller and the worker always stay on 127.0.0.1.",
    )
    add("--api-port", type=int, default=8000, help="API and web chat port (default 8000)")
    add("--controller-port", type=int, default=21001, help="controller port (default 21001)")
    add("--worker-port", type=int, default=21002, help="worker port (default 21002)")
    add("--api-keys", help="comma-separated bearer keys the API requires (default: none)")
    add(
        "--no-api",
        dest="with_api",
        action="store_false",
        help="start only the controller and the worker (e.g. for TinyChat's web server)",
    )
    add("--log-format", choices=["json", "text"], default="text", help="children's log format")
    add(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the stack to answer (loading a model can take minutes)",
    )
    add(
        "--stop-timeout",
        type=float,
        default=10.0,
        help="seconds a child gets to stop before it is killed",
    )


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: tuple[str, ...]


def _vilaserve(*args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "vilaserve.entrypoints.cli", *args)


def _optional(flag: str, value: object) -> tuple[str, ...]:
    return () if value is None else (flag, str(value))


def child_specs(args: argparse.Namespace) -> list[ChildSpec]:
    """The children in start order: controller, worker, API."""
    controller = f"http://{LOOPBACK}:{args.controller_port}"
    log = ("--log-format", args.log_format)
    specs = [
        ChildSpec(
            "controller", _vilaserve("controller", "--port", str(args.controller_port), *log)
        ),
        ChildSpec(
            "worker",
            _vilaserve(
                "worker",
                "--model-path",
                args.model_path,
                *_optional("--model-name", args.model_name),
                *_optional("--quant-path", args.quant_path),
                *_optional("--vision-tower", args.vision_tower),
                *_optional("--precision", args.precision),
                *_optional("--device", args.device),
                *_optional("--dtype", args.dtype),
                *_optional("--conv-template", args.conv_template),
                "--controller-address",
                controller,
                "--worker-address",
                f"http://{LOOPBACK}:{args.worker_port}",
                "--port",
                str(args.worker_port),
                # Streams in flight at Ctrl-C end (with an error chunk) before serve's SIGKILL.
                "--drain-timeout-s",
                f"{max(args.stop_timeout - 2, 0):g}",
                *log,
            ),
        ),
    ]
    if args.with_api:
        api = _vilaserve(
            "api",
            "--controller-address",
            controller,
            "--host",
            args.host,
            "--port",
            str(args.api_port),
            *_optional("--api-keys", args.api_keys),
            *log,
        )
        specs.append(ChildSpec("api", api))
    return specs


def _exit_with_parent() -> None:
    """Runs in the child before exec: on Linux, ask for SIGTERM when serve itself dies (even by
    SIGKILL), so that no orphan keeps a port."""
    with contextlib.suppress(Exception):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


REGISTRATION_SECRET_ENV = "VILASERVE_REGISTRATION_SECRET"


class Supervisor:
    """Starts the children, notices when one dies, and stops them all."""

    def __init__(self, stop_timeout_s: float, say: Callable[[str], None]) -> None:
        self._stop_timeout_s = stop_timeout_s
        self._say = say
        self._children: list[tuple[ChildSpec, subprocess.Popen[bytes]]] = []

    def start(self, spec: ChildSpec) -> None:
        process = subprocess.Popen(
            spec.argv,
            # A session of their own: the terminal's Ctrl-C reaches only serve, which stops them
            # with one SIGTERM each (a child that also got SIGINT would see two signals, and
            # uvicorn takes a second one as "exit now").
            start_new_session=True,
            preexec_fn=_exit_with_parent if sys.platform.startswith("linux") else None,
        )
        self._children.append((spec, process))
        self._say(f"started {spec.name} (pid {process.pid})")

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [process for _, process in self._children]

    def dead_child(self) -> tuple[str, int] | None:
        for spec, process in self._children:
            code = process.poll()
            if code is not None:
                return spec.name, code
        return None

    def stop(self, interrupts: Callable[[], int]) -> None:
        """SIGTERM to every child, last started first; SIGKILL to those still running after the
        stop timeout, or at once if the user interrupts again."""
        running = [(s, p) for s, p in reversed(self._children) if p.poll() is None]
        for _, process in running:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        deadline = time.monotonic() + self._stop_timeout_s
        already = interrupts()
        for spec, process in running:
            while process.poll() is None:
                if time.monotonic() > deadline or interrupts() > already:
                    self._say(f"{spec.name} (pid {process.pid}) did not stop; killing it")
                    process.kill()
                    process.wait()
                    break
                time.sleep(0.05)


class _Signals:
    """Counts SIGINT / SIGTERM instead of raising, so the supervisor decides what to do."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> _Signals:
        self._previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1


def _url_host(host: str) -> str:
    """Where a local browser reaches a server bound to `host`."""
    if host in ("", "0.0.0.0", "::"):
        return LOOPBACK
    return f"[{host}]" if ":" in host else host


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _get(method: str, url: str) -> httpx.Response | None:
    try:
        return httpx.request(method, url, timeout=2.0)
    except httpx.HTTPError:
        return None


class _Startup:
    """What "the stack is up" means, one check per child."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.controller = f"http://{LOOPBACK}:{args.controller_port}"
        self.api = f"http://{_url_host(args.host)}:{args.api_port}"
        self.models: list[str] = []

    def ready(self, name: str) -> bool:
        if name == "controller":
            reply = _get("GET", self.controller + "/test_connection")
            return reply is not None and reply.is_success
        if name == "worker":
            # The controller is fresh: any model it lists was registered by our worker.
            reply = _get("POST", self.controller + "/list_models")
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                self.models = list(reply.json()["models"]) if reply is not None else []
            return bool(self.models)
        reply = _get("GET", self.api + "/health")
        return reply is not None and reply.is_success

    @staticmethod
    def waiting_for(name: str) -> str:
        return {
            "controller": "the controller to answer /test_connection",
            "worker": "the worker to load the model and register",
            "api": "the API to answer /health",
        }[name]


def run_serve(args: argparse.Namespace) -> int:
    """Runs the stack until Ctrl-C / SIGTERM (exit 0) or until a child dies (exit 1)."""

    def say(message: str) -> None:
        print(f"vilaserve serve: {message}", flush=True)

    specs = child_specs(args)
    binds = [(LOOPBACK, args.controller_port, "--controller-port")]
    binds.append((LOOPBACK, args.worker_port, "--worker-port"))
    if args.with_api:
        binds.append((args.host, args.api_port, "--api-port"))
    for host, port, flag in binds:
        if _port_in_use(host, port):
            say(f"port {port} on {host} is already in use; choose another with {flag}")
            return 1

    # The controller takes registrations only from holders of this run's secret; the children
    # inherit it through the environment (never on a command line, where `ps` shows it).
    os.environ.setdefault(REGISTRATION_SECRET_ENV, secrets.token_urlsafe(32))
    startup = _Startup(args)
    supervisor = Supervisor(args.stop_timeout, say)
    with _Signals() as signals:
        try:
            return _supervise(args, specs, supervisor, startup, signals, say)
        finally:
            say("stopping")
            supervisor.stop(lambda: signals.count)
            say("stopped")


def _supervise(
    args: argparse.Namespace,
    specs: list[ChildSpec],
    supervisor: Supervisor,
    startup: _Startup,
    signals: _Signals,
    say: Callable[[str], None],
) -> int:
    # All at once: the worker retries its registration until the controller answers, and the
    # API asks the controller per request, so no child needs another to be up first.
    for spec in specs:
        supervisor.start(spec)
    deadline = time.monotonic() + args.startup_timeout
    for spec in specs:
        while not startup.ready(spec.name):
            if signals.count:
                return 0
            if (dead := supervisor.dead_child()) is not None:
                say(f"the {dead[0]} {_exit(dead[1])} while starting (see its log above)")
                return 1
            if time.monotonic() > deadline:
                waiting = startup.waiting_for(spec.name)
                say(f"gave up after {args.startup_timeout:g} s waiting for {waiting}")
                return 1
            time.sleep(POLL_S)
    models = ", ".join(startup.models)
    say(f"serving {models}; controller at {startup.controller}")
    if args.with_api:
        print(f"Model: {models}", flush=True)
        print(f"Chat: {startup.api}/", flush=True)
    say("press Ctrl-C to stop")
    while not signals.count:
        if (dead := supervisor.dead_child()) is not None:
            say(f"the {dead[0]} {_exit(dead[1])} unexpectedly; stopping the others")
            return 1
        time.sleep(POLL_S)
    return 0


def _exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
