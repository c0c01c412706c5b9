"""The OpenAI-compatible use cases: chat completions, text completions, the model list."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from vilaserve.application.api.completion_relay import CompletionRelay, Reply, RunOptions
from vilaserve.application.api.image_inputs import ImageResolver
from vilaserve.application.api.model_router import ModelInfo, ModelRouter
from vilaserve.domain.api.chat_prompt import build_chat_prompt, check_completion_prompt
from vilaserve.domain.api.errors import ApiError
from vilaserve.domain.api.openai_requests import parse_chat_request, parse_completion_request
from vilaserve.domain.api.openai_responses import (
    ChatFormat,
    CompletionFormat,
    ResponseIdentity,
    ToolCallReading,
    model_card,
)
from vilaserve.domain.api.structured_outputs import StructuredOutput
from vilaserve.domain.api.tool_grammar import tool_call_grammar
from vilaserve.domain.api.tool_syntax import tool_convention_for
from vilaserve.domain.api.worker_jobs import WorkerJob, job_for
from vilaserve.domain.shared.conversation import ChatTemplateRenderer
from vilaserve.domain.shared.errors import Unavailable


def _identity(prefix: str, model: str) -> ResponseIdentity:
    return ResponseIdentity(f"{prefix}-{uuid.uuid4().hex}", model, int(time.time()))


class ChatCompletion:
    """`/v1/chat/completions`: messages with text and images -> the worker's template."""

    def __init__(
        self,
        router: ModelRouter,
        relay: CompletionRelay,
        images: ImageResolver,
        renderer: ChatTemplateRenderer,
    ) -> None:
        self._router = router
        self._relay = relay
        self._images = images
        self._renderer = renderer  # for a worker whose template is its tokenizer's Jinja one

    async def __call__(self, body: Any) -> Reply:
        request = parse_chat_request(body)
        identity = _identity("chatcmpl", request.model)
        options = RunOptions(request.stream, request.include_usage, request.n)
        tools = request.tool_policy
        async with self._relay.admit() as admitted:
            route = await self._router.route(request.model)
            info = route.info
            prompt = build_chat_prompt(
                info.template, request.messages, info.details.multimodal, self._renderer, tools
            )
            constraint = request.output_constraint
            reading = None
            if tools is not None:  # the template's tool syntax, held by a grammar
                syntax = tool_convention_for(info.template).syntax
                constraint = StructuredOutput("grammar", tool_call_grammar(syntax, tools))
                reading = ToolCallReading(syntax, [t.name for t in tools.callable_tools])
            images = await self._images.resolve(prompt.image_urls)
            job = job_for(
                request,
                prompt.text,
                info.template,
                info.details.context_length,
                images,
                constraint,
            )
            jobs = [job.for_choice(i) for i in range(request.n)]
            fmt = ChatFormat(identity, request.include_usage, reading)
            return await self._relay.run(admitted, route, jobs, fmt, options)


class Completion:
    """`/v1/completions`: raw text prompts, no template, no images."""

    def __init__(self, router: ModelRouter, relay: CompletionRelay) -> None:
        self._router = router
        self._relay = relay

    async def __call__(self, body: Any) -> Reply:
        request = parse_completion_request(body)
        prompts = request.prompts
        for index, prompt in enumerate(prompts):
            check_completion_prompt(prompt, index)
        echoed: Sequence[str] = ()
        if request.echo:
            echoed = [p for p in prompts for _ in range(request.n)]
        fmt = CompletionFormat(_identity("cmpl", request.model), request.include_usage, echoed)
        options = RunOptions(request.stream, request.include_usage, request.n)
        constraint = request.output_constraint
        async with self._relay.admit() as admitted:
            route = await self._router.route(request.model)
            info = route.info
            jobs: list[WorkerJob] = []
            for prompt in prompts:  # choice index = prompt index * n + j, as OpenAI numbers them
                job = job_for(
                    request, prompt, info.template, info.details.context_length, (), constraint
                )
                jobs += [job.for_choice(j) for j in range(request.n)]
            return await self._relay.run(admitted, route, jobs, fmt, options)


class ListModels:
    """`/v1/models`: the controller's models, with context length and image support once a
    worker has described them (asked for once per model, then cached)."""

    def __init__(self, router: ModelRouter) -> None:
        self._router = router

    async def __call__(self) -> dict[str, Any]:
        names = await self._router.list_models()
        infos = await asyncio.gather(*(self._info(name) for name in names))
        created = int(time.time())
        cards = [
            model_card(
                name,
                created,
                info.details.context_length if info else None,
                info.details.multimodal if info else None,
            )
            for name, info in zip(names, infos, strict=True)
        ]
        return {"object": "list", "data": cards}

    async def model(self, name: str) -> dict[str, Any] | None:
        listing = await self()
        return next((card for card in listing["data"] if card["id"] == name), None)

    async def _info(self, name: str) -> ModelInfo | None:
        known = self._router.known_info(name)
        if known is not None:
            return known
        try:
            return (await self._router.route(name)).info
        except (ApiError, Unavailable):
            return None  # listed by the controller, but its worker is not answering now
