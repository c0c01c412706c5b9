"""The `vilaserve` command: one subcommand per entrypoint."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vilaserve.entrypoints import serve
from vilaserve.entrypoints.api import main as api_main
from vilaserve.entrypoints.controller import main as controller_main
from vilaserve.entrypoints.worker import main as worker_main

# The offline commands and the terminal chat import torch and transformers (seconds): their
# modules load only when one of them is the command, so `serve` and the services start fast.
_LAZY_COMMANDS = {
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
    worker = commands.add_parser("worker", help="run a model worker (TinyChat/FastChat protocol)")
    worker_main.add_worker_arguments(worker)
    controller = commands.add_parser("controller", help="run the controller (FastChat protocol)")
    controller_main.add_controller_arguments(controller)
    api = commands.add_parser("api", help="run the OpenAI-compatible API server and web chat")
    api_main.add_api_arguments(api)
    stack = commands.add_parser(
        "serve", help="run controller, worker and API on this machine and print the chat URL"
    )
    serve.add_serve_arguments(stack)
    lazy = {name: commands.add_parser(name, help=text) for name, text in _LAZY_COMMANDS.items()}
    wanted = _chosen_command(args_list)
    if wanted == "quantize":
        from vilaserve.entrypoints.offline import quantize

        quantize.add_quantize_arguments(lazy["quantize"])
    elif wanted in ("train-demo-vision", "build-demo"):
        from vilaserve.entrypoints.offline import demo

        demo.add_train_arguments(lazy["train-demo-vision"])
        demo.add_build_arguments(lazy["build-demo"])
    elif wanted == "chat":
        from vilaserve.entrypoints import chat

        chat.add_chat_arguments(lazy["chat"])
    lazy["build-tiny"].add_argument("path", nargs="?", default=".cache/tiny-vila")
    args = parser.parse_args(args_list)
    if args.command == "worker":
        worker_main.serve(worker_main.settings_from_args(args))
    elif args.command == "controller":
        controller_main.run_controller(args)
    elif args.command == "api":
        api_main.run_api(args)
    elif args.command == "serve":
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
