"""The `vilaserve` command: one subcommand per entrypoint."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class _Command:
    help: str
    module: str  # imported only when this is the command
    add_arguments: Callable[[Any, argparse.ArgumentParser], object]
    run: Callable[[Any, argparse.Namespace, list[str]], object]


# Each command's module loads only when it is the command: the services import FastAPI and
# uvicorn, the offline commands and the chat torch and transformers (seconds), and none of them
# needs another's. `vilaserve --help` lists them all without loading any.
_COMMANDS = {
    "worker": _Command(
        "run a model worker (TinyChat/FastChat protocol)",
        "vilaserve.entrypoints.worker.main",
        lambda m, parser: m.add_worker_arguments(parser),
        lambda m, args, _: m.run_worker(args),
    ),
    "controller": _Command(
        "run the controller (FastChat protocol)",
        "vilaserve.entrypoints.controller.main",
        lambda m, parser: m.add_controller_arguments(parser),
        lambda m, args, _: m.run_controller(args),
    ),
    "api": _Command(
        "run the OpenAI-compatible API server and web chat",
        "vilaserve.entrypoints.api.main",
        lambda m, parser: m.add_api_arguments(parser),
        lambda m, args, _: m.run_api(args),
    ),
    "serve": _Command(
        "run controller, worker and API on this machine and print the chat URL",
        "vilaserve.entrypoints.serve",
        lambda m, parser: m.add_serve_arguments(parser),
        lambda m, args, _: sys.exit(m.run_serve(args)),
    ),
    "quantize": _Command(
        "AWQ 4-bit quantization of a checkpoint",
        "vilaserve.entrypoints.offline.quantize",
        lambda m, parser: m.add_quantize_arguments(parser),
        lambda m, args, _: print(m.quantize_checkpoint(args)),
    ),
    "train-demo-vision": _Command(
        "train the demo model's vision tower and projector (CPU, ~37 min)",
        "vilaserve.entrypoints.offline.demo",
        lambda m, parser: m.add_train_arguments(parser),
        lambda m, args, argv: m.run_train(args, argv),
    ),
    "build-demo": _Command(
        "build (once, cached) the demo model and print its directory",
        "vilaserve.entrypoints.offline.demo",
        lambda m, parser: m.add_build_arguments(parser),
        lambda m, args, _: m.run_build(args),
    ),
    "chat": _Command(
        "ask a model about pictures in the terminal (default: the demo model)",
        "vilaserve.entrypoints.chat",
        lambda m, parser: m.add_chat_arguments(parser),
        lambda m, args, _: sys.exit(m.run_chat(args)),
    ),
    "build-tiny": _Command(
        "write a tiny random VILA checkpoint (once) for protocol checks; print its path",
        "vilaserve.adapters.offline.checkpoints.tiny_vila",
        lambda _, parser: parser.add_argument("path", nargs="?", default=".cache/tiny-vila"),
        lambda m, args, _: print(m.ensure_tiny_vila(Path(args.path))),
    ),
}


def main(argv: Sequence[str] | None = None) -> None:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vilaserve", description="Serve VILA models.")
    commands = parser.add_subparsers(dest="command", required=True)
    subparsers = {name: commands.add_parser(name, help=c.help) for name, c in _COMMANDS.items()}
    wanted = _chosen_command(args_list)
    if wanted in subparsers:
        command = _COMMANDS[wanted]
        command.add_arguments(importlib.import_module(command.module), subparsers[wanted])
    args = parser.parse_args(args_list)
    command = _COMMANDS[args.command]
    command.run(importlib.import_module(command.module), args, args_list)


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand, read before parsing so that heavy modules load only for their command."""
    return next((a for a in argv if not a.startswith("-")), None)


if __name__ == "__main__":
    main()
