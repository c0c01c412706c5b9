"""Which worker serves a model, and what that model needs (template, context length), cached.

FastChat's API server makes five sequential HTTP calls per request (list_models,
get_worker_address, conv template, model_details, count_token). Here a request costs at most
one controller lookup: the worker address is cached for a few seconds (so the controller's
load balancing still applies), the model's template and details until a worker fails. A
failure drops both, and the next request asks the controller again.

A worker that cannot be reached before anything was sent to the client is failed over once per
request (`failover`): whether it failed when first described or when its streams were opened.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from vilaserve.domain.api.chat_prompt import template_from_worker
from vilaserve.domain.api.errors import ApiError, ModelNotFound, NoWorker
from vilaserve.domain.api.ports import ModelDirectory
from vilaserve.domain.shared.conversation import ConversationTemplate
from vilaserve.domain.shared.errors import WorkerUnavailable
from vilaserve.domain.shared.worker_gateway import ModelDetails, WorkerGateway

log = logging.getLogger(__name__)

DEFAULT_ADDRESS_TTL_S = 5.0
DEFAULT_INFO_TTL_S = 600.0


@dataclass(frozen=True)
class ModelInfo:
    name: str
    details: ModelDetails
    template: ConversationTemplate


@dataclass(frozen=True)
class Route:
    model: str
    address: str
    info: ModelInfo
    address_was_cached: bool
    is_failover: bool = False  # this route replaces one whose worker could not be reached


@dataclass(frozen=True)
class _Expiring:
    value: object
    expires: float


class ModelRouter:
    def __init__(
        self,
        directory: ModelDirectory,
        gateway: WorkerGateway,
        address_ttl_s: float = DEFAULT_ADDRESS_TTL_S,
        info_ttl_s: float = DEFAULT_INFO_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._directory = directory
        self._gateway = gateway
        self._address_ttl_s = address_ttl_s
        self._info_ttl_s = info_ttl_s
        self._clock = clock
        self._addresses: dict[str, _Expiring] = {}
        self._infos: dict[str, _Expiring] = {}

    async def route(self, model: str) -> Route:
        """A worker for `model` and its facts. Raises `ModelNotFound` or a 503 error."""
        cached = self._fresh(self._addresses, model)
        try:
            return await self._route(model, cached if isinstance(cached, str) else None)
        except WorkerUnavailable as exc:  # the worker named (or cached) could not describe it
            failure = exc
        return await self.failover(model, failure)

    async def failover(
        self, model: str, failure: WorkerUnavailable, failed: Route | None = None
    ) -> Route:
        """Another route for `model` after its worker could not be reached (`failure`), before
        anything was sent to the client: forget what is cached, have the controller check its
        workers, and look one up once more (another one, or the same if it is back). A request
        fails over once: when `failed` is itself a failover, `failure` is raised."""
        if failed is not None and failed.is_failover:
            raise failure
        self.forget(model)
        await self._directory.refresh_workers()
        return await self._route(model, None, is_failover=True)

    async def _route(self, model: str, address: str | None, is_failover: bool = False) -> Route:
        from_cache = address is not None
        if address is None:
            address = await self._directory.worker_address(model)
            if not address:
                raise await self._no_worker_error(model)
            self._addresses[model] = _Expiring(address, self._clock() + self._address_ttl_s)
        info = self._fresh(self._infos, model)
        if not isinstance(info, ModelInfo):
            info = await self._describe(model, address)
            self._infos[model] = _Expiring(info, self._clock() + self._info_ttl_s)
        return Route(model, address, info, from_cache, is_failover)

    def forget(self, model: str) -> None:
        """Drops what is cached about `model`, after one of its workers failed."""
        self._addresses.pop(model, None)
        self._infos.pop(model, None)

    def known_info(self, model: str) -> ModelInfo | None:
        info = self._fresh(self._infos, model)
        return info if isinstance(info, ModelInfo) else None

    async def list_models(self) -> list[str]:
        return sorted(set(await self._directory.list_models()))

    async def _describe(self, model: str, address: str) -> ModelInfo:
        details, conv = await asyncio.gather(
            self._gateway.model_details(address, model),
            self._gateway.conversation_template(address, model),
        )
        template = template_from_worker(conv)
        log.info(
            "model described",
            extra={
                "model": model,
                "worker": address,
                "context_length": details.context_length,
                "template": template.name,
            },
        )
        return ModelInfo(model, details, template)

    async def _no_worker_error(self, model: str) -> ApiError:
        # Only on this error path: a second controller call tells "unknown" from "no worker".
        models = await self.list_models()
        if model in models:
            return NoWorker(f"no worker for model '{model}' is available right now; retry later")
        if not models:
            return NoWorker("no model worker is registered with the controller")
        return ModelNotFound(
            f"the model '{model}' does not exist; available: {', '.join(models)}", param="model"
        )

    def _fresh(self, cache: dict[str, _Expiring], key: str) -> object | None:
        entry = cache.get(key)
        if entry is None or entry.expires <= self._clock():
            return None
        return entry.value
