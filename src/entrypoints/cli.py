"""The `vilaserve` command: one subcommand per entrypoint."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# Each command's module loads only when it is the command: the services import FastAPI and
# uvicorn, the offline commands and the chat torch and transformers (seconds), and none of them
# needs another's. `vilaserve --help` lists them all without loading any.
_COMMANDS = {
    "worker": "run a model worker (TinyChat/FastChat protocol)",
    "controller": "run the controller (FastChat protocol)",
    "api": "run the OpenAI-compatible API server and web chat",
    "serve": "run controller, worker and API on this machine and print the chat URL",
    "quantize": "AWQ 4-bit quantization of a checkpoint",
    "train-demo-vision": "train the demo model's vision tower and projector (CPU, ~37 min)",
    "build-demo": "build (once, cached) the demo model and print its directory",
    "chat": "ask a model about pictures in the terminal (default: the demo model)",
    "build-tiny": "write a tiny random VILA checkpoint (once) for protocol checks; print its path",
}


def main(argv: Sequence[str] | None = None) -> None:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vilaserve", description="Serve VILA models.")
    commands = parser.add_subparsers(dest="command", required=True)
    subparsers = {name: commands.add_parser(name, help=text) for name, text in _COMMANDS.items()}
    wanted = _chosen_command(args_list)
    if wanted in subparsers:
        _add_arguments(wanted, subparsers[wanted])
    args = parser.parse_args(args_list)
    _run(args, args_list)


def _add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    if command == "worker":
        from vilaserve.entrypoints.worker import main as worker_main

        worker_main.add_worker_arguments(parser)
    elif command == "controller":
        from vilaserve.entrypoints.controller import main as controller_main

        controller_main.add_controller_arguments(parser)
    elif command == "api":
        from vilaserve.entrypoints.api import main as api_main

        api_main.add_api_arguments(parser)
    elif command == "serve":
        from vilaserve.entrypoints import serve

        serve.add_serve_arguments(parser)
    elif command == "quantize":
        from vilaserve.entrypoints.offline import quantize

        quantize.add_quantize_arguments(parser)
    elif command == "train-demo-vision":
        from vilaserve.entrypoints.offline import demo

        demo.add_train_arguments(parser)
    elif command == "build-demo":
        from vilaserve.entrypoints.offline import demo

        demo.add_build_arguments(parser)
    elif command == "chat":
        from vilaserve.entrypoints import chat

        chat.add_chat_arguments(parser)
    elif command == "build-tiny":
        parser.add_argument("path", nargs="?", default=".cache/tiny-vila")


def _run(args: argparse.Namespace, args_list: list[str]) -> None:
    if args.command == "worker":
        from vilaserve.entrypoints.worker import main as worker_main

        worker_main.serve(worker_main.settings_from_args(args))
    elif args.command == "controller":
        from vilaserve.entrypoints.controller import main as controller_main

        controller_main.run_controller(args)
    elif args.command == "api":
        from vilaserve.entrypoints.api import main as api_main

        api_main.run_api(args)
    elif args.command == "serve":
        from vilaserve.entrypoints import serve

        sys.exit(serve.run_serve(args))
    elif args.command == "quantize":
        from vilaserve.entrypoints.offline import quantize

        print(quantize.quantize_checkpoint(args))
    elif args.command == "train-demo-vision":
        from vilaserve.entrypoints.offline import demo

        demo.run_train(args, args_list)
    elif args.command == "build-demo":
        from vilaserve.entrypoints.offline import demo

        demo.run_build(args)
    elif args.command == "chat":
        from vilaserve.entrypoints import chat

        sys.exit(chat.run_chat(args))
    elif args.command == "build-tiny":
        from pathlib import Path

        from vilaserve.adapters.offline.checkpoints.tiny_vila import ensure_tiny_vila

        print(ensure_tiny_vila(Path(args.path)))


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand, read before parsing so that heavy modules load only for their command."""
    return next((a for a in argv if not a.startswith("-")), None)


if __name__ == "__main__":
    main()
