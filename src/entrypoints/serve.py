"""`vilaserve serve`: controller, model worker and API on one machine, from one command.

Each piece runs as a child process of its own (the same `vilaserve` subcommands one would start
by hand). This process only supervises: it waits until the stack answers, prints the chat URL,
restarts a worker that dies (with a back-off, up to --worker-restarts times in a row), and on
Ctrl-C / SIGTERM, or when the controller or the API dies, stops all of them.

With `--ray ADDRESS|auto` there are no children: the workers are Ray Serve replicas on a Ray
cluster and the API runs in this process in front of them (entrypoints/ray/runner.py).

Secrets reach the children through their environment, never their command line (which `ps`
shows every user): the registration secret, the API keys (API only) and, with keys, a per-run
internal token.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Protocol

import httpx

from vilaserve.adapters.shared.worker_client import bearer

LOOPBACK = "127.0.0.1"
POLL_S = 0.2

REGISTRATION_SECRET_ENV = "VILASERVE_REGISTRATION_SECRET"
# Read by the worker, the controller and the API (their `internal_token` setting).
INTERNAL_TOKEN_ENV = "VILASERVE_INTERNAL_TOKEN"
# What the API reads its keys from (ApiSettings: VILASERVE_API_ prefix, and the shorter name).
API_KEYS_ENV = "VILASERVE_API_API_KEYS"
SHORT_API_KEYS_ENV = "VILASERVE_API_KEYS"
API_KEYS_FILE_ENV = "VILASERVE_API_API_KEYS_FILE"


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value:g}")
    return value


RAY_INSTALL_HINT = 'serve --ray needs Ray Serve: pip install -e ".[ray]"'


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    ray = parser.add_argument_group(
        "Ray Serve (instead of the controller and one worker; needs the [ray] extra)"
    )
    add = ray.add_argument
    add(
        "--ray",
        metavar="ADDRESS|auto",
        help="run the workers as Ray Serve replicas on the Ray cluster at ADDRESS (as `ray "
        "start --head` prints it, or ray://host:10001), or on a local one started for the run "
        "(auto); the API and web chat run here, in front of them",
    )
    add("--replicas", type=_positive, default=1, help="replicas (default 1)")
    add(
        "--min-replicas",
        type=_count,
        help="autoscale between --min-replicas and --max-replicas on the requests in flight "
        "per replica (--target-ongoing-requests)",
    )
    add("--max-replicas", type=_positive, help="see --min-replicas")
    add(
        "--target-ongoing-requests",
        type=float,
        default=2.0,
        help="autoscaling: requests in flight per replica it aims at (default 2)",
    )
    add("--replica-cpus", type=_share, default=1.0, help="CPUs per replica (default 1)")
    add("--replica-gpus", type=_share, default=0.0, help="GPUs per replica (default 0)")
    add(
        "--no-cache-aware-routing",
        dest="cache_aware",
        action="store_false",
        help="route each request by load alone (default: a conversation about a picture goes "
        "back to the replica that holds the picture and the conversation's prefix)",
    )


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
    add(
        "--api-keys",
        help="comma-separated bearer keys the API requires (default: none). Visible to every "
        "user through `ps`: prefer --api-keys-file or VILASERVE_API_KEYS",
    )
    add(
        "--api-keys-file",
        metavar="PATH",
        help="file of bearer keys the API requires, one a line or comma-separated; only its "
        "owner may read it (mode 0600). Also: VILASERVE_API_KEYS in the environment",
    )
    add(
        "--no-internal-token",
        dest="internal_token",
        action="store_false",
        help=f"with keys: do not give the children a per-run internal token ({INTERNAL_TOKEN_ENV})",
    )
    add(
        "--worker-restarts",
        type=_count,
        default=RestartPolicy.limit,
        metavar="N",
        help="restart a worker that dies, up to N times in a row (back-off 1 s, 2 s, 4 s ... "
        "30 s; a worker that ran 60 s starts the count again); 0: a dead worker stops "
        "everything (default 5)",
    )
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
    add_ray_arguments(parser)


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: tuple[str, ...]
    # Added to serve's own environment for this child: where its secrets go (not `argv`).
    env: Mapping[str, str] = field(default_factory=dict)


def _vilaserve(*args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "vilaserve.entrypoints.cli", *args)


def _optional(flag: str, value: object) -> tuple[str, ...]:
    return () if value is None else (flag, str(value))


def child_specs(
    args: argparse.Namespace, api_keys: tuple[str, ...] = (), internal_token: str | None = None
) -> list[ChildSpec]:
    """The children in start order: controller, worker, API."""
    controller = f"http://{LOOPBACK}:{args.controller_port}"
    log = ("--log-format", args.log_format)
    shared = {INTERNAL_TOKEN_ENV: internal_token} if internal_token else {}
    specs = [
        ChildSpec(
            "controller",
            _vilaserve("controller", "--port", str(args.controller_port), *log),
            shared,
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
            shared,
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
            *log,
        )
        keys = {API_KEYS_ENV: ",".join(api_keys)} if api_keys else {}
        specs.append(ChildSpec("api", api, {**keys, **shared}))
    return specs


def api_keys(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[str, ...]:
    """Every key the API is to require: --api-keys, --api-keys-file (or the API's own file
    variable), and the API's key variables. Raises ValueError for a keys file that is
    unreadable, empty, or open to group or others."""
    keys: list[str] = list(_comma_list(args.api_keys or ""))
    path = args.api_keys_file or environ.get(API_KEYS_FILE_ENV)
    if path:
        # Here, not at the top: only a run with a keys file pays for the API's settings module.
        from vilaserve.entrypoints.api.settings import read_api_keys_file

        keys += read_api_keys_file(path)
    for variable in (API_KEYS_ENV, SHORT_API_KEYS_ENV):
        keys += _comma_list(environ.get(variable, ""))
    return tuple(dict.fromkeys(keys))


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def internal_token(
    args: argparse.Namespace, keys: tuple[str, ...], environ: Mapping[str, str]
) -> str | None:
    """The children's shared token for their calls to each other: one given to serve is handed
    on (as the registration secret is), else a new one per run when the API has keys; none
    with --no-internal-token."""
    if not args.internal_token:
        return None
    given = environ.get(INTERNAL_TOKEN_ENV)
    if given:
        return given
    return secrets.token_urlsafe(32) if keys else None


def _exit_with_parent() -> None:
    """Runs in the child before exec: on Linux, ask for SIGTERM when serve itself dies (even by
    SIGKILL), so that no orphan keeps a port."""
    with contextlib.suppress(Exception):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass(frozen=True)
class Death:
    name: str
    code: int  # the exit status; -N: killed by signal N
    uptime_s: float


@dataclass
class _Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes]
    started_s: float
    death_told: bool = False


class Supervisor:
    """Starts the children, notices when one dies, and stops them all."""

    def __init__(self, stop_timeout_s: float, say: Callable[[str], None]) -> None:
        self._stop_timeout_s = stop_timeout_s
        self._say = say
        self._children: dict[str, _Child] = {}

    def start(self, spec: ChildSpec) -> None:
        """Starts `spec`; a child of the same name (restarted) takes its predecessor's place, so
        the stop order stays the reverse of the first start order."""
        process = subprocess.Popen(
            spec.argv,
            env={**os.environ, **spec.env} if spec.env else None,
            # A session of their own: the terminal's Ctrl-C reaches only serve, which stops them
            # with one SIGTERM each (a child that also got SIGINT would see two signals, and
            # uvicorn takes a second one as "exit now").
            start_new_session=True,
            preexec_fn=_exit_with_parent if sys.platform.startswith("linux") else None,
        )
        self._children[spec.name] = _Child(spec, process, time.monotonic())
        self._say(f"started {spec.name} (pid {process.pid})")

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [child.process for child in self._children.values()]

    def dead_child(self) -> Death | None:
        """A child that has exited, each one told once."""
        for child in self._children.values():
            code = child.process.poll()
            if code is not None and not child.death_told:
                child.death_told = True
                uptime_s = time.monotonic() - child.started_s
                return Death(child.spec.name, code, uptime_s)
        return None

    def stop(self, interrupts: Callable[[], int]) -> None:
        """SIGTERM to every child, last started first; SIGKILL to those still running after the
        stop timeout, or at once if the user interrupts again."""
        children = reversed(self._children.values())
        running = [(c.spec, c.process) for c in children if c.process.poll() is None]
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


@dataclass(frozen=True)
class RestartPolicy:
    """How often, and how soon, a dead worker is started again."""

    limit: int = 5  # restarts in a row; beyond them serve stops everything
    first_delay_s: float = 1.0  # then twice as long each time
    max_delay_s: float = 30.0
    stable_after_s: float = 60.0  # a worker up this long died of something new: count anew


class RestartCount:
    """The restarts of one child in a row: the back-off before the next one, or the end."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.restarts = 0

    def next_delay_s(self, uptime_s: float) -> float | None:
        """Seconds to wait before restarting a child that died after `uptime_s`; None once it
        was restarted `limit` times in a row (a crash loop: a bad model, no memory)."""
        if uptime_s >= self.policy.stable_after_s:
            self.restarts = 0
        if self.restarts >= self.policy.limit:
            return None
        self.restarts += 1
        delay = self.policy.first_delay_s * 2 ** (self.restarts - 1)
        return min(delay, self.policy.max_delay_s)


def restart_policy(args: argparse.Namespace) -> RestartPolicy:
    return RestartPolicy(limit=args.worker_restarts)


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


class _StackProbe:
    """What "the stack is up" means, one check per child; and the worker's way back."""

    def __init__(self, args: argparse.Namespace, internal_token: str | None = None) -> None:
        self.controller = f"http://{LOOPBACK}:{args.controller_port}"
        self.worker = f"http://{LOOPBACK}:{args.worker_port}"
        self.api = f"http://{_url_host(args.host)}:{args.api_port}"
        self.models: list[str] = []
        # serve's own calls to the controller and the worker carry the run's internal token.
        self._headers = bearer(internal_token)

    def _call(self, method: str, url: str) -> httpx.Response | None:
        try:
            return httpx.request(method, url, headers=self._headers, timeout=2.0)
        except httpx.HTTPError:
            return None

    def ready(self, name: str) -> bool:
        if name == "controller":
            reply = self._call("GET", self.controller + "/test_connection")
            return reply is not None and reply.is_success
        if name == "worker":
            # The controller is fresh: any model it lists was registered by our worker.
            reply = self._call("POST", self.controller + "/list_models")
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                self.models = list(reply.json()["models"]) if reply is not None else []
            return bool(self.models)
        reply = self._call("GET", self.api + "/health")
        return reply is not None and reply.is_success

    def forget_worker(self) -> None:
        """Has the controller re-check its workers now (FastChat's /refresh_all_workers), so it
        drops the dead one at once rather than at its heartbeat expiry: the API answers 503
        without trying it, and a model listed again means the new worker has registered."""
        self._call("POST", self.controller + "/refresh_all_workers")

    def worker_serving(self) -> bool:
        # The worker listens only once its model is loaded, and registers right then.
        listening = self._call("POST", self.worker + "/worker_get_status") is not None
        return listening and self.ready("worker")

    @staticmethod
    def waiting_for(name: str) -> str:
        return {
            "controller": "the controller to answer /test_connection",
            "worker": "the worker to load the model and register",
            "api": "the API to answer /health",
        }[name]


class _WorkerRecovery(Protocol):
    """What the watch asks of the stack while a worker is restarted (`_StackProbe`)."""

    def forget_worker(self) -> None: ...

    def worker_serving(self) -> bool: ...


class _Interrupts(Protocol):
    count: int


def run_serve(args: argparse.Namespace) -> int:
    """Runs the stack until Ctrl-C / SIGTERM (exit 0), or until the controller or the API dies
    or the worker dies more often than --worker-restarts allows (exit 1)."""

    def say(message: str) -> None:
        print(f"vilaserve serve: {message}", flush=True)

    if getattr(args, "ray", None):
        return _run_on_ray(args, say)
    try:
        keys = api_keys(args, os.environ) if args.with_api else ()
    except ValueError as exc:
        say(str(exc))
        return 1
    if args.api_keys:
        say(
            "warning: --api-keys puts keys on serve's command line, visible to every user "
            "through `ps`; prefer --api-keys-file (mode 0600) or VILASERVE_API_KEYS. The API "
            "gets them through its environment."
        )
    token = internal_token(args, keys, os.environ)
    if not args.internal_token:
        os.environ.pop(INTERNAL_TOKEN_ENV, None)  # nor one serve was given
    specs = child_specs(args, keys, token)
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
    probe = _StackProbe(args, token)
    supervisor = Supervisor(args.stop_timeout, say)
    with _Signals() as signals:
        try:
            return _supervise(args, specs, supervisor, probe, signals, say)
        finally:
            say("stopping")
            supervisor.stop(lambda: signals.count)
            say("stopped")


def _run_on_ray(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    if importlib.util.find_spec("ray") is None:
        say(RAY_INSTALL_HINT)
        return 1
    # Here, not at the top: controller mode never loads Ray.
    from vilaserve.entrypoints.ray.runner import run_ray_serve

    return run_ray_serve(args)


def _supervise(
    args: argparse.Namespace,
    specs: list[ChildSpec],
    supervisor: Supervisor,
    startup: _StackProbe,
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
                say(f"the {dead.name} {_exit(dead.code)} while starting (see its log above)")
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
    worker = next(spec for spec in specs if spec.name == "worker")
    return watch(supervisor, worker, RestartCount(restart_policy(args)), startup, signals, say)


def watch(
    supervisor: Supervisor,
    worker: ChildSpec,
    restarts: RestartCount,
    stack: _WorkerRecovery,
    signals: _Interrupts,
    say: Callable[[str], None],
) -> int:
    """The stack once up: restarts the worker when it dies (after its back-off; the API answers
    503 meanwhile), until an interrupt (0), the controller's or the API's death, or one worker
    death too many (1)."""
    restart_at: float | None = None
    coming_back = False
    while not signals.count:
        if (dead := supervisor.dead_child()) is not None:
            if dead.name != worker.name or restarts.policy.limit == 0:
                say(f"the {dead.name} {_exit(dead.code)} unexpectedly; stopping the others")
                return 1
            delay_s = restarts.next_delay_s(dead.uptime_s)
            if delay_s is None:
                say(
                    f"the worker {_exit(dead.code)} after {restarts.restarts} restarts "
                    "(--worker-restarts); stopping the others"
                )
                return 1
            say(
                f"the worker {_exit(dead.code)}; restarting in {delay_s:g} s "
                f"(restart {restarts.restarts} of {restarts.policy.limit})"
            )
            stack.forget_worker()
            restart_at, coming_back = time.monotonic() + delay_s, False
        if restart_at is not None and time.monotonic() >= restart_at:
            supervisor.start(worker)
            restart_at, coming_back = None, True
        elif coming_back and stack.worker_serving():
            say("the worker is serving again")
            coming_back = False
        time.sleep(POLL_S)
    return 0


def _exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
