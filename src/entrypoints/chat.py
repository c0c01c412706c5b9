"""`vilaserve chat`: ask a model about pictures in the terminal, in this process.

It loads the worker's model adapter and asks through the same use cases the worker serves, with
no HTTP in between. Without `--model-path` it asks the embedded demo model (built on first use).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from vilaserve.entrypoints.shared.logging_setup import configure_logging


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("question", help='what to ask, e.g. "what is in the picture?"')
    add("--image", action="append", default=[], type=Path, help="a picture (repeatable)")
    add("--model-path", default=None, help="a VILA checkpoint (default: the demo model)")
    add(
        "--precision",
        choices=["W16A16", "W4A16"],
        default=None,
        help="default: W4A16 for an AWQ checkpoint (the demo's), else W16A16",
    )
    add("--max-new-tokens", type=int, default=64)
    add("--temperature", type=float, default=0.0, help="0: greedy")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])


def run_chat(args: argparse.Namespace) -> int:
    from vilaserve.adapters.shared.jinja_chat_template import JinjaChatTemplateRenderer
    from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions
    from vilaserve.application.chat.ask_image import AskAboutImages, AskFailed
    from vilaserve.application.worker.engine.engine import Engine
    from vilaserve.application.worker.engine.scheduler import SchedulerConfig
    from vilaserve.application.worker.engine.text_generator import EngineTextGenerator

    configure_logging("text", logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the answer is all the terminal should show
    if args.model_path:
        model_path = args.model_path
    else:
        from vilaserve.entrypoints.offline.demo import build_demo

        model_path = str(build_demo("awq"))
    precision = args.precision or checkpoint_precision(model_path)
    try:
        images = [path.read_bytes() for path in args.image]
    except OSError as exc:
        sys.exit(f"cannot read the image: {exc}")
    runtime = VilaRuntime.load(
        VilaRuntimeOptions(
            model_path=model_path, precision=precision, device=args.device, kv_slots=1
        )
    )
    engine = Engine(runtime.model_runner, SchedulerConfig(max_num_seqs=1))
    asker = AskAboutImages(
        EngineTextGenerator(engine),
        runtime.vision_encoder,
        renderer=JinjaChatTemplateRenderer(),
    )

    async def stream() -> None:
        pieces = asker.ask(
            args.question,
            images,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
        )
        async for piece in pieces:
            print(piece, end="", flush=True)
        print()

    try:
        asyncio.run(stream())
    except AskFailed as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    return 0


def checkpoint_precision(model_path: str | Path) -> str:
    """W4A16 when the checkpoint's `llm/` is an AWQ one (its config says so), else W16A16."""
    from vilaserve.adapters.worker.awq.loading import has_awq_config

    try:
        return "W4A16" if has_awq_config(Path(model_path) / "llm") else "W16A16"
    except (OSError, ValueError):
        return "W16A16"  # the runtime reports what is wrong with the directory
