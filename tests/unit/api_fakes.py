"""Fakes for the API server's ports (controller, workers, image fetching), and an app on them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dependency_injector import providers
from fastapi.testclient import TestClient

from vilaserve.domain.api.errors import BadRequest
from vilaserve.domain.api.ports import FetchedImage, ImageFetcher, ModelDirectory
from vilaserve.domain.shared.conversation import TEMPLATES, ConversationTemplate
from vilaserve.domain.shared.errors import ControllerUnavailable, WorkerUnavailable
from vilaserve.domain.shared.worker_gateway import ModelDetails, WorkerGateway
from vilaserve.domain.shared.worker_status import WorkerStatus
from vilaserve.entrypoints.api.app import create_api_app
from vilaserve.entrypoints.api.container import ApiContainer
from vilaserve.entrypoints.api.settings import ApiSettings

MODEL = "VILA1.5-3b"
ADDRESS = "http://worker-1"
PNG_DATA_URL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="


@dataclass
class FakeDirectory(ModelDirectory):
    """`models` maps a model to its worker address ("" = registered name but no worker)."""

    models: dict[str, str] = field(default_factory=lambda: {MODEL: ADDRESS})
    down: bool = False
    lookups: list[str] = field(default_factory=list)
    listings: int = 0
    refreshes: int = 0
    after_refresh: dict[str, str] | None = None  # what it names once it checked its workers

    async def list_models(self) -> list[str]:
        if self.down:
            raise ControllerUnavailable("http://ctl", "connection refused")
        self.listings += 1
        return [m for m, address in self.models.items() if address]

    async def worker_address(self, model: str) -> str | None:
        if self.down:
            raise ControllerUnavailable("http://ctl", "connection refused")
        self.lookups.append(model)
        return self.models.get(model) or None

    async def refresh_workers(self) -> None:
        self.refreshes += 1
        if self.after_refresh is not None:
            self.models = dict(self.after_refresh)


@dataclass
class FakeWorkerGateway(WorkerGateway):
    """Replies `reply` piece by piece (one piece = one token), as a worker with echo off.

    `refuse` makes the first frame an error with that code; `fail_after` breaks the stream
    after that many frames with an error frame; `down` lists addresses that do not answer;
    `finish` is the last frame's finish reason ("grammar_error": the worker's constraint
    dead-ended).
    """

    reply: tuple[str, ...] = ("Hello", ",", " world", "!")
    finish: str = "stop"
    context_length: int = 64
    multimodal: bool = True
    template: ConversationTemplate = TEMPLATES["vicuna_v1"]
    refuse: tuple[int, str] | None = None
    fail_after: int | None = None
    delay_s: float = 0.0
    down: set[str] = field(default_factory=set)
    payloads: list[dict[str, Any]] = field(default_factory=list)
    described: int = 0
    yielded: int = 0
    closed: int = 0
    at_once: int = 0
    most_at_once: int = 0

    def _check(self, address: str) -> None:
        if address in self.down:
            raise WorkerUnavailable(address, "connection refused")

    async def get_status(self, address: str, timeout_s: float = 5.0) -> WorkerStatus:
        self._check(address)
        return WorkerStatus((MODEL,), 1, 0)

    async def model_details(self, address: str, model: str) -> ModelDetails:
        self._check(address)
        self.described += 1
        return ModelDetails(self.context_length, self.multimodal, 4)

    async def conversation_template(self, address: str, model: str) -> dict[str, Any]:
        self._check(address)
        return self.template.to_fastchat_dict()

    async def stream_generate(
        self, address: str, payload: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        self._check(address)
        self.payloads.append(payload)
        if self.refuse is not None:
            yield {"text": self.refuse[1], "error_code": self.refuse[0]}
            return
        prompt_tokens = len(payload["prompt"].split()) + 4 * len(payload.get("images", []))
        text = ""
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        try:
            for i, piece in enumerate(self.reply):
                if self.fail_after is not None and i == self.fail_after:
                    yield {"text": "simulated kernel failure", "error_code": 50001}
                    return
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                text += piece
                n = i + 1
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n}
                stop = next((s for s in payload["stop"] if s in text), None)
                if stop is not None:
                    yield _frame(text[: text.index(stop)], usage, "stop")
                    return
                last = n == len(self.reply)
                at_limit = n >= payload["max_new_tokens"]
                finish = self.finish if last else ("length" if at_limit else None)
                self.yielded += 1
                yield _frame(text, usage, finish)
                if finish:
                    return
        finally:
            self.at_once -= 1
            self.closed += 1


def _frame(text: str, usage: dict[str, int], finish: str | None) -> dict[str, Any]:
    return {"text": text, "error_code": 0, "usage": usage, "finish_reason": finish}


@dataclass
class FakeImageFetcher(ImageFetcher):
    images: dict[str, bytes] = field(default_factory=dict)

    async def fetch(self, url: str) -> FetchedImage:
        if url not in self.images:
            raise BadRequest(f"the image at {url!r} could not be fetched (HTTP 404)")
        return FetchedImage(self.images[url], "image/png")


@dataclass
class FakeApi:
    client: TestClient
    container: ApiContainer
    directory: FakeDirectory
    workers: FakeWorkerGateway


@contextmanager
def fake_api(
    directory: FakeDirectory | None = None,
    workers: FakeWorkerGateway | None = None,
    fetcher: ImageFetcher | None = None,
    **settings: Any,
) -> Iterator[FakeApi]:
    directory = directory or FakeDirectory()
    workers = workers or FakeWorkerGateway()
    container = ApiContainer(settings=ApiSettings(log_format="text", **settings))
    container.model_directory.override(providers.Object(directory))
    container.worker_gateway.override(providers.Object(workers))
    container.image_fetcher.override(providers.Object(fetcher))
    with TestClient(create_api_app(container)) as client:
        yield FakeApi(client, container, directory, workers)


def sse_events(raw: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded, with `[DONE]` kept as a string."""
    events: list[Any] = []
    for block in raw.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def chat_body(text: str = "What is it?", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}
