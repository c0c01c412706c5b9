"""`vilaserve controller`: the FastChat / TinyChat-compatible controller.

Workers register with it and send heartbeats; clients ask it where a model is served, or send
their generation to its `/worker_generate_stream`, which relays the chosen worker's stream.
"""

from __future__ import annotations

import argparse

from vilaserve.entrypoints.controller.app import create_controller_app
from vilaserve.entrypoints.controller.container import ControllerContainer
from vilaserve.entrypoints.controller.settings import ControllerSettings
from vilaserve.entrypoints.shared.http_server import add_http_limit_arguments
from vilaserve.entrypoints.shared.internal_access import add_allowed_hosts_argument
from vilaserve.entrypoints.shared.logging_setup import configure_logging
from vilaserve.entrypoints.shared.service_command import serve_http, settings_from_args


def add_controller_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults are None so that only flags given on the command line override the environment
    # (VILASERVE_CONTROLLER_*) and the settings' own defaults.
    add = parser.add_argument
    add("--host", help="address to bind (default 127.0.0.1)")
    add("--port", type=int, help="port to bind (default 21001)")
    add(
        "--dispatch-method",
        choices=["shortest_queue", "lottery"],
        help="how to choose among the workers of a model (default shortest_queue)",
    )
    add(
        "--heart-beat-expiration",
        type=float,
        help="seconds without a heartbeat before a worker is dropped (default 90; TinyChat 30)",
    )
    add(
        "--worker-api-timeout",
        type=float,
        help="seconds a proxied generation may wait for the worker's next frame (default 100)",
    )
    add_allowed_hosts_argument(parser)
    add(
        "--registration-secret",
        help="shared secret required from workers on registration and heartbeats; prefer the "
        "VILASERVE_REGISTRATION_SECRET environment variable (a flag shows in `ps`)",
    )
    add_http_limit_arguments(parser, max_connections=4096, max_request_mib=64)
    add("--log-format", choices=["json", "text"], help="log line format (default json)")


def run_controller(args: argparse.Namespace) -> None:
    settings = settings_from_args(ControllerSettings, args, "vilaserve controller")
    configure_logging(settings.log_format)
    app = create_controller_app(ControllerContainer(settings=settings))
    serve_http("controller", app, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_controller_arguments(parser)
    run_controller(parser.parse_args())


if __name__ == "__main__":
    main()
