"""The `vilaserve` command: one subcommand per entrypoint."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vilaserve.entrypoints import model_worker, quantize


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vilaserve", description="Serve VILA models.")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="run a model worker (TinyChat/FastChat protocol)")
    model_worker.add_worker_arguments(worker)
    quantizer = commands.add_parser("quantize", help="AWQ 4-bit quantization of a checkpoint")
    quantize.add_quantize_arguments(quantizer)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "worker":
        model_worker.serve(model_worker.settings_from_args(args))
    elif args.command == "quantize":
        print(quantize.quantize_checkpoint(args))


if __name__ == "__main__":
    main()
