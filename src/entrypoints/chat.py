"""`vilaserve chat`: ask a model about pictures in the terminal.

When a running stack (`make demo`, `vilaserve serve`) already serves the model this command
would load, it asks that stack's OpenAI API and prints its answer (about a second) instead of
loading the model (tens of seconds on a small CPU). Otherwise, or with `--in-process`, it loads
the worker's model adapter and asks through the same use cases the worker serves, with no HTTP
in between. Without `--model-path` it asks the embedded demo model (built on first use).

Torch and transformers are imported only on the in-process path: the answer through the API
must not wait for them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from vilaserve.adapters.offline.demo.build_cache import MODEL_DIR_NAME
from vilaserve.adapters.shared.openai_chat_client import (
    ApiAnswerBroke,
    ApiUnreachable,
    ApiUnusable,
    OpenAiChatClient,
)
from vilaserve.domain.worker.naming import derive_model_name
from vilaserve.entrypoints.shared.logging_setup import configure_logging

DEFAULT_API_URL = "http://127.0.0.1:8000"  # where `vilaserve serve` puts its API
API_KEYS_ENV = "VILASERVE_API_KEYS"  # the keys a keyed API was started with (comma-separated)
DEMO_PRECISION = "W4A16"  # the default demo build is the AWQ one


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
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="in-process only")
    add(
        "--api-url",
        default=DEFAULT_API_URL,
        help="ask the running stack whose API is here when it serves the model "
        f"(default {DEFAULT_API_URL}); else load the model in this process",
    )
    add(
        "--api-key",
        default=None,
        help=f"key of a keyed API (default: the first of {API_KEYS_ENV} in the environment)",
    )
    add(
        "--in-process",
        action="store_true",
        help="load the model in this process even when a running stack serves it",
    )


def run_chat(args: argparse.Namespace) -> int:
    try:
        images = [path.read_bytes() for path in args.image]
    except OSError as exc:
        sys.exit(f"cannot read the image: {exc}")
    if not args.in_process:
        exit_code = ask_running_stack(args, images)
        if exit_code is not None:
            return exit_code
    return ask_in_process(args, images)


def served_model_name(args: argparse.Namespace) -> str:
    """The name a stack serving the model this command would load lists it under: the one
    the worker derives from its `--model-path` and `--precision`."""
    if args.model_path:
        precision = args.precision or checkpoint_precision(args.model_path)
        return derive_model_name(args.model_path, precision)
    # The demo's directory is named MODEL_DIR_NAME; reading its name needs no build.
    return derive_model_name(MODEL_DIR_NAME, args.precision or DEMO_PRECISION)


def ask_running_stack(args: argparse.Namespace, images: list[bytes]) -> int | None:
    """The exit code once the stack at `--api-url` has answered; None when it cannot, after
    one stderr line saying why when an API answered but could not be used."""
    model = served_model_name(args)
    api_key = args.api_key or _first_key(os.environ.get(API_KEYS_ENV, ""))
    with OpenAiChatClient(args.api_url, api_key) as client:
        try:
            served = client.served_models()
            if model not in served:
                listed = ", ".join(served) or "no model"
                raise ApiUnusable(f"the API at {args.api_url} serves {listed}, not {model}")
            pieces = client.ask(
                model,
                args.question,
                images,
                max_tokens=args.max_new_tokens,
                temperature=args.temperature,
            )
            return _print_answer(pieces)
        except ApiUnreachable:
            return None  # no stack: the ordinary case, nothing to say
        except ApiUnusable as exc:
            print(f"vilaserve chat: {exc}; loading the model here instead", file=sys.stderr)
            return None


def _first_key(keys: str) -> str | None:
    return next((key.strip() for key in keys.split(",") if key.strip()), None)


def _print_answer(pieces: Iterator[str]) -> int:
    """Prints the answer as the in-process path does: pieces as they come, then a newline."""
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
    except ApiAnswerBroke as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    print()
    return 0


def ask_in_process(args: argparse.Namespace, images: list[bytes]) -> int:
    """Loads the model here and prints its answer."""
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
    from vilaserve.adapters.worker.awq.config_detection import has_awq_config

    try:
        return "W4A16" if has_awq_config(Path(model_path) / "llm") else "W16A16"
    except (OSError, ValueError, AttributeError):
        return "W16A16"  # the runtime reports what is wrong with the directory
