"""`python -m vilaserve.entrypoints.worker.main` / `vilaserve worker`: serve one VILA model.

Accepts TinyChat's model_worker flags, so existing launch scripts keep working.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn

from vilaserve.entrypoints.shared.http_server import (
    add_http_limit_arguments,
    http_server_config,
    limits_of,
)
from vilaserve.entrypoints.shared.internal_access import add_allowed_hosts_argument
from vilaserve.entrypoints.shared.logging_setup import configure_logging
from vilaserve.entrypoints.shared.service_command import settings_from_args
from vilaserve.entrypoints.worker.app import create_worker_app
from vilaserve.entrypoints.worker.container import WorkerContainer
from vilaserve.entrypoints.worker.settings import WorkerSettings


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    # Every default is None so that only flags given on the command line override the
    # environment (VILASERVE_*) and the settings' own defaults.
    add = parser.add_argument
    add("--host", help="address to bind (default 127.0.0.1)")
    add("--port", type=int, help="port to bind (default 21002)")
    add("--worker-address", help="URL the controller uses to reach this worker")
    add("--controller-address", help="controller URL (default http://localhost:21001)")
    add("--model-path", help="VILA checkpoint directory (config.json, llm/, vision_tower/, ...)")
    add("--model-name", help="name to serve under (default: derived from the path)")
    add("--model-type", help="accepted for TinyChat compatibility (the checkpoint decides)")
    add("--quant-path", help="AWQ checkpoint of the LLM (W4A16)")
    add(
        "--vision-tower",
        help="LLaVA-1.5: local folder of the vision tower its config names by hub id "
        "(mm_vision_tower, e.g. a download of openai/clip-vit-large-patch14-336)",
    )
    add("--precision", choices=["W16A16", "W4A16"], help="weights: 16-bit or 4-bit AWQ")
    add(
        "--embedding-bits",
        type=int,
        choices=[8, 16],
        help="W4A16: token embedding table in int8 (default 8) or 16-bit as stored",
    )
    add(
        "--quantize-vision-tower",
        choices=["none", "w8a8"],
        help="w8a8: the vision tower in int8 weights and 7-bit activations, smoothed with the "
        "factors `vilaserve quantize --smooth-vision-tower` wrote (faster first token on a "
        "picture on AVX2 CPUs; default none)",
    )
    add("--device", choices=["auto", "cpu", "cuda"], help="where to run (default auto)")
    add("--dtype", choices=["auto", "bfloat16", "float16", "float32"], help="compute dtype")
    add("--conv-template", help="override the conversation template (vicuna_v1, llama_3, ...)")
    add(
        "--image-cache-mb",
        type=int,
        help="MB of projected image embeddings kept, so a picture asked about again is not "
        "encoded again (default 256; 0: off)",
    )
    add(
        "--limit-model-concurrency",
        type=int,
        help="requests running at once, the engine's batch (default 8); more wait in the queue",
    )
    add(
        "--max-num-seqs",
        type=int,
        help="sequences decoded together in one step (default and at most: "
        "--limit-model-concurrency)",
    )
    add(
        "--max-num-batched-tokens",
        type=int,
        help="positions computed per engine step (default 2048)",
    )
    add(
        "--prefill-chunk",
        type=int,
        help="most prompt positions per step while other streams decode (default 512)",
    )
    add(
        "--max-itl-slowdown",
        type=float,
        help="while streams decode, size prompt chunks so a step takes at most this many times "
        "a decode-only step (default 2.5): lower keeps their inter-token latency flatter, "
        "higher fills long prompts sooner",
    )
    add(
        "--kv-slots",
        type=int,
        help="KV-cache rows: running sequences plus finished prefixes kept for reuse "
        "(default 2 x --max-num-seqs)",
    )
    add("--max-model-len", type=int, help="positions per sequence (default: the model's context)")
    add(
        "--max-queue-length",
        type=int,
        help="requests allowed to wait, pictures being encoded included (default 64); "
        "beyond, error 42903 at once",
    )
    add(
        "--max-image-pixels",
        type=int,
        help="largest picture accepted, width x height from its header (default 64M)",
    )
    add(
        "--max-request-pixels",
        type=int,
        help="pixels of all of a request's images together (default 256M); each image is "
        "also held to --max-image-pixels",
    )
    add_allowed_hosts_argument(parser)
    add(
        "--max-prompt-chars",
        type=int,
        help="longest prompt, refused before tokenizing (default 32 x the model's context)",
    )
    add("--stream-interval", type=int, help="tokens between streamed chunks (default 1)")
    add("--max-new-tokens-cap", type=int, help="upper bound on max_new_tokens (default 1024)")
    add("--heartbeat-interval-s", type=float, help="seconds between heartbeats (default 15)")
    add(
        "--drain-timeout-s",
        type=float,
        help="on SIGTERM: seconds in-flight requests get to finish before they end with an "
        "error chunk (default 30); the controller forgets the worker at once",
    )
    add(
        "--no-adaptive-threads",
        dest="adaptive_threads",
        action="store_const",
        const=False,
        help="CPU: keep every compute thread even while other processes on the host use its "
        "cores (default: one fewer per core they take, back once they leave it; a thread "
        "sharing its core stalls every barrier of a step)",
    )
    add(
        "--no-register",
        dest="register_with_controller",
        action="store_const",
        const=False,
        help="do not register with a controller",
    )
    add(
        "--multi-modal",
        dest="multi_modal",
        action="store_const",
        const=True,
        help="register as multimodal (default: when the checkpoint has a vision tower)",
    )
    add(
        "--registration-secret",
        help="shared secret sent to the controller on registration and heartbeats; prefer the "
        "VILASERVE_REGISTRATION_SECRET environment variable (a flag shows in `ps`)",
    )
    add_http_limit_arguments(parser, max_connections=4096, max_request_mib=64)
    add("--log-format", choices=["json", "text"], help="log line format (default json)")


def run_worker(args: argparse.Namespace) -> None:
    serve(settings_from_args(WorkerSettings, args, "vilaserve worker"))


def serve(settings: WorkerSettings) -> None:
    configure_logging(settings.log_format)
    # Fail in a second, not after torch has loaded (~15 s), when the path is plainly wrong.
    root = Path(settings.model_path)
    if not (root / "config.json").is_file():
        sys.exit(f"--model-path {root}: no config.json there (not a VILA checkpoint directory)")
    container = WorkerContainer(settings=settings)
    app = create_worker_app(container)
    logging.getLogger(__name__).info(
        "starting worker", extra={"host": settings.host, "port": settings.port}
    )
    config = http_server_config(
        app,
        settings.host,
        settings.port,
        limits_of(settings),
        # A backstop only: the drain ends streams itself at --drain-timeout-s.
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 10,
    )
    DrainingServer(config, app).run()


class DrainingServer(uvicorn.Server):
    """uvicorn, plus the worker's drain at the first SIGTERM / SIGINT (app.py's `drain`):
    uvicorn stops accepting and waits for open connections; the drain tells the controller
    and bounds the wait."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self._app = app
        self._draining = False
        self._tasks: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                # uvicorn re-raises the signal once shut down; a drained worker exits 0.
                self._captured_signals.clear()

    def handle_exit(self, sig: int, frame: Any) -> None:
        drain = getattr(self._app.state, "drain", None)
        if not self._draining and drain is not None and not self.should_exit:
            self._draining = True
            # In a signal handler: start the drain from the event loop's own next turn.
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(lambda: self._tasks.add(loop.create_task(drain())))
        super().handle_exit(sig, frame)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_worker_arguments(parser)
    run_worker(parser.parse_args(argv))


if __name__ == "__main__":
    main()
