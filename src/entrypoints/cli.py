"""The `vilaserve` command: one subcommand per entrypoint."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vilaserve.entrypoints import api_main, controller_main, model_worker, serve


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vilaserve", description="Serve VILA models.")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="run a model worker (TinyChat/FastChat protocol)")
    model_worker.add_worker_arguments(worker)
    quantizer = commands.add_parser("quantize", help="AWQ 4-bit quantization of a checkpoint")
    wanted = _chosen_command(sys.argv[1:] if argv is None else argv)
    if wanted == "quantize":
        # quantize imports torch and transformers (seconds); the other commands do not need them.
        from vilaserve.entrypoints import quantize

        quantize.add_quantize_arguments(quantizer)
    demo_commands = {
        "train-demo-vision": "train the demo model's vision tower and projector (CPU, ~37 min)",
        "build-demo": "build (once, cached) the demo model and print its directory",
        "chat": "ask a model about pictures in the terminal (default: the demo model)",
    }
    demo_parsers = {
        name: commands.add_parser(name, help=text) for name, text in demo_commands.items()
    }
    if wanted in demo_commands:
        # Like quantize: torch and transformers load only for the demo commands themselves.
        from vilaserve.entrypoints import demo_cli

        demo_cli.add_train_arguments(demo_parsers["train-demo-vision"])
        demo_cli.add_build_arguments(demo_parsers["build-demo"])
        demo_cli.add_chat_arguments(demo_parsers["chat"])
    controller = commands.add_parser("controller", help="run the controller (FastChat protocol)")
    controller_main.add_controller_arguments(controller)
    stack = commands.add_parser(
        "serve", help="run controller, worker and API on this machine and print the chat URL"
    )
    serve.add_serve_arguments(stack)
    api = commands.add_parser("api", help="run the OpenAI-compatible API server and web chat")
    api_main.add_api_arguments(api)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "worker":
        model_worker.serve(model_worker.settings_from_args(args))
    elif args.command == "quantize":
        from vilaserve.entrypoints import quantize

        print(quantize.quantize_checkpoint(args))
    elif args.command == "train-demo-vision":
        from vilaserve.entrypoints import demo_cli

        demo_cli.run_train(args, list(sys.argv[1:] if argv is None else argv))
    elif args.command == "build-demo":
        from vilaserve.entrypoints import demo_cli

        demo_cli.run_build(args)
    elif args.command == "chat":
        from vilaserve.entrypoints import demo_cli

        sys.exit(demo_cli.run_chat(args))
    elif args.command == "controller":
        controller_main.run_controller(args)
    elif args.command == "serve":
        sys.exit(serve.run_serve(args))
    elif args.command == "api":
        api_main.run_api(args)


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand, read before parsing so that heavy modules load only for their command."""
    return next((a for a in argv if not a.startswith("-")), None)


if __name__ == "__main__":
    main()
