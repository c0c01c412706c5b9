"""`vilaserve serve --ray ADDRESS|auto`: the worker replicas as a Ray Serve application on a
cluster, and the OpenAI API and web chat in this process, in front of them.

ADDRESS is a running cluster's (`ray start --head` prints it; `ray://host:10001` for a remote
client); `auto` starts a local one for the run. Replicas are placed, health-checked, restarted
and scaled by Ray Serve; this process logs their states as they change. On Ctrl-C the
application is deleted from the cluster (a local cluster stops with this process).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import serve

from vilaserve.entrypoints.api.app import create_api_app
from vilaserve.entrypoints.api.settings import ApiSettings
from vilaserve.entrypoints.ray.app import api_container, ray_fleet, worker_application
from vilaserve.entrypoints.ray.options import APP_NAME, WORKER_DEPLOYMENT, FleetOptions
from vilaserve.entrypoints.ray.replica_states import ReplicaStateLog
from vilaserve.entrypoints.serve import _port_in_use, _url_host, api_keys
from vilaserve.entrypoints.shared.logging_setup import configure_logging
from vilaserve.entrypoints.shared.service_command import serve_http

LOCAL_CLUSTER = "auto"


def fleet_options_from_args(args: argparse.Namespace) -> FleetOptions:
    worker = {
        "model_path": args.model_path,
        "model_name": args.model_name,
        "quant_path": args.quant_path,
        "vision_tower": args.vision_tower,
        "precision": args.precision,
        "device": args.device,
        "dtype": args.dtype,
        "conv_template": args.conv_template,
    }
    return FleetOptions(
        worker={k: v for k, v in worker.items() if v is not None},
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus,
        cache_aware=args.cache_aware,
    )


def run_ray_serve(args: argparse.Namespace) -> int:
    """Deploys the replicas, then serves the API until Ctrl-C / SIGTERM (0); 1 when the
    replicas do not come up within --startup-timeout or the options are refused."""

    def say(message: str) -> None:
        print(f"vilaserve serve: {message}", flush=True)

    try:
        options = fleet_options_from_args(args)
        keys = api_keys(args, os.environ) if args.with_api else ()
    except ValueError as exc:
        say(str(exc))
        return 1
    if args.with_api and _port_in_use(args.host, args.api_port):
        say(f"port {args.api_port} on {args.host} is already in use; choose another: --api-port")
        return 1
    local = args.ray == LOCAL_CLUSTER
    say("starting a local Ray cluster" if local else f"joining the Ray cluster at {args.ray}")
    # "local": a new instance even where another one runs on this machine.
    ray.init(address="local" if local else args.ray, include_dashboard=False)
    # SIGTERM stops the run as Ctrl-C does: the application leaves the cluster either way.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        # No Ray HTTP proxy: the API below is the only way in.
        serve.start(proxy_location="Disabled")
        states = ReplicaStateLog(serve.status, APP_NAME, WORKER_DEPLOYMENT, say)
        with contextlib.suppress(KeyboardInterrupt):
            handle = _deploy(options, args.startup_timeout, states, say)
            if handle is None:
                return 1
            states.start()
            try:
                return _serve_api(args, options, handle, keys, say)
            finally:
                states.stop()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        say("stopping")
        if not local:  # a cluster of its own stops with ray.shutdown()
            serve.delete(APP_NAME)
        ray.shutdown()
        say("stopped")


def _deploy(
    options: FleetOptions,
    timeout_s: float,
    states: ReplicaStateLog,
    say: Callable[[str], None],
) -> Any | None:
    """The deployment's handle once every replica is up (serve.run waits for that), saying
    the replicas' states meanwhile; None after `timeout_s`."""
    outcome: dict[str, Any] = {}

    def deploy() -> None:
        try:
            outcome["handle"] = serve.run(
                worker_application(options), name=APP_NAME, route_prefix=None
            )
        except Exception as exc:
            outcome["error"] = exc

    scaling = options.autoscaling_config()
    count = (
        f"{scaling['min_replicas']} to {scaling['max_replicas']} replicas"
        if scaling
        else f"{options.replicas} replica{'s' * (options.replicas > 1)}"
    )
    say(f"deploying {count} of {options.model_name}")
    thread = threading.Thread(target=deploy, name="serve-run", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive():
        states.check()
        if time.monotonic() > deadline:
            say(f"gave up after {timeout_s:g} s waiting for the replicas to load the model")
            return None
        thread.join(1.0)
    if "error" in outcome:
        say(f"the replicas could not be deployed: {outcome['error']}")
        return None
    states.check()
    return outcome["handle"]


def _serve_api(
    args: argparse.Namespace,
    options: FleetOptions,
    handle: Any,
    keys: tuple[str, ...],
    say: Callable[[str], None],
) -> int:
    fleet = ray_fleet(handle, options)
    if not args.with_api:
        say("serving the replicas only (--no-api); press Ctrl-C to stop")
        _wait_for_interrupt()
        return 0
    if args.api_keys:
        say(
            "warning: --api-keys puts keys on serve's command line, visible to every user "
            "through `ps`; prefer --api-keys-file (mode 0600) or VILASERVE_API_KEYS."
        )
    settings = ApiSettings(
        host=args.host, port=args.api_port, api_keys=",".join(keys), log_format=args.log_format
    )
    configure_logging(settings.log_format)
    say(f"serving {options.model_name} on Ray Serve ({fleet.address})")
    print(f"Model: {options.model_name}", flush=True)
    print(f"Chat: http://{_url_host(args.host)}:{args.api_port}/", flush=True)
    say("press Ctrl-C to stop")
    # Returns when uvicorn stops (Ctrl-C / SIGTERM).
    serve_http("api", create_api_app(api_container(fleet, settings)), settings)
    return 0


def _wait_for_interrupt() -> None:
    threading.Event().wait()  # until KeyboardInterrupt (Ctrl-C or SIGTERM)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
