"""`vilaserve api` / `python -m vilaserve.entrypoints.api.main`: the OpenAI-compatible API
server and its web chat, in front of a FastChat-style controller and its workers."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from vilaserve.entrypoints.api.app import create_api_app
from vilaserve.entrypoints.api.container import ApiContainer
from vilaserve.entrypoints.api.settings import ApiSettings
from vilaserve.entrypoints.shared.http_server import add_http_limit_arguments
from vilaserve.entrypoints.shared.logging_setup import configure_logging
from vilaserve.entrypoints.shared.service_command import serve_http, settings_from_args


def add_api_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults are None so that only flags given override VILASERVE_API_* and the settings.
    add = parser.add_argument
    add("--controller-address", help="controller URL (default http://localhost:21001)")
    add("--host", help="address to bind (default 127.0.0.1)")
    add("--port", type=int, help="port to bind (default 8000)")
    add("--api-keys", help="comma-separated bearer keys clients must send (default: none)")
    add(
        "--api-keys-file",
        metavar="PATH",
        help="more keys, one a line or comma-separated, from a file only its owner may read "
        "(mode 0600); unlike --api-keys, not visible to `ps` (also VILASERVE_API_KEYS)",
    )
    add(
        "--allow-private-image-hosts",
        action="store_const",
        const=True,
        help="with --allow-remote-images: also fetch from loopback, private and link-local "
        "addresses (default: public addresses only)",
    )
    add(
        "--public-metrics",
        action="store_const",
        const=True,
        help="with --api-keys: serve /metrics without a key (default: a key is needed)",
    )
    add(
        "--no-web-chat",
        dest="web_chat",
        action="store_const",
        const=False,
        help="do not serve the web chat page at /",
    )
    add(
        "--allow-remote-images",
        action="store_const",
        const=True,
        help="fetch image_url parts given as http(s) URLs (default: only data URLs)",
    )
    add("--image-domains", help="comma-separated hosts remote images may come from (default any)")
    add("--image-fetch-timeout-s", type=float, help="time limit per remote image (default 5)")
    add("--max-concurrent-requests", type=int, help="requests held at once (default 256)")
    add("--worker-timeout-s", type=float, help="longest silence from a worker (default 300)")
    add_http_limit_arguments(parser, max_connections=4096, max_request_mib=32)
    add("--log-format", choices=["json", "text"], help="log line format (default json)")


def run_api(args: argparse.Namespace) -> None:
    # e.g. a keys file others can read ends the program with that one line
    settings = settings_from_args(ApiSettings, args, "vilaserve api")
    configure_logging(settings.log_format)
    serve_http("api", create_api_app(ApiContainer(settings=settings)), settings)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_api_arguments(parser)
    run_api(parser.parse_args(argv))


if __name__ == "__main__":
    main()
