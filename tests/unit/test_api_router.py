"""Worker routing and its caches: at most one controller lookup per request."""

from __future__ import annotations

import asyncio

import pytest
from api_fakes import ADDRESS, MODEL, FakeDirectory, FakeWorkerApi, chat_body, fake_api

from vilaserve.application.api.model_router import ModelRouter
from vilaserve.domain.api.errors import ModelNotFound, NoWorker
from vilaserve.domain.shared.errors import ControllerUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def router(directory: FakeDirectory, workers: FakeWorkerApi, clock: Clock) -> ModelRouter:
    return ModelRouter(directory, workers, address_ttl_s=5, info_ttl_s=60, clock=clock)


def test_addresses_are_cached_briefly_and_model_facts_longer() -> None:
    directory, workers, clock = FakeDirectory(), FakeWorkerApi(), Clock()
    routes = router(directory, workers, clock)
    first = asyncio.run(routes.route(MODEL))
    assert (first.address, first.address_was_cached) == (ADDRESS, False)
    assert first.info.details.context_length == 64 and first.info.template.name == "vicuna_v1"
    clock.now += 4
    again = asyncio.run(routes.route(MODEL))
    assert again.address_was_cached and len(directory.lookups) == 1
    clock.now += 2  # the address expired; the template and context length did not
    asyncio.run(routes.route(MODEL))
    assert len(directory.lookups) == 2 and workers.described == 1
    clock.now += 60
    asyncio.run(routes.route(MODEL))
    assert workers.described == 2
    routes.forget(MODEL)
    assert routes.known_info(MODEL) is None


def test_a_stale_cached_worker_is_replaced_with_one_fresh_lookup() -> None:
    directory, workers, clock = FakeDirectory(), FakeWorkerApi(), Clock()
    routes = router(directory, workers, clock)
    asyncio.run(routes.route(MODEL))
    routes._infos.clear()  # force a describe call against the cached address
    workers.down.add(ADDRESS)
    directory.models[MODEL] = "http://worker-2"
    route = asyncio.run(routes.route(MODEL))
    assert route.address == "http://worker-2" and not route.address_was_cached
    assert len(directory.lookups) == 2


def test_unknown_model_no_worker_and_controller_down() -> None:
    clock = Clock()
    directory = FakeDirectory(models={MODEL: ADDRESS, "idle": ""})
    routes = router(directory, FakeWorkerApi(), clock)
    with pytest.raises(ModelNotFound, match=r"available: VILA1\.5-3b"):
        asyncio.run(routes.route("nope"))
    empty = router(FakeDirectory(models={}), FakeWorkerApi(), clock)
    with pytest.raises(NoWorker, match="no model worker is registered"):
        asyncio.run(empty.route(MODEL))
    listed_but_gone = FakeDirectory(models={MODEL: ADDRESS})
    gone = router(listed_but_gone, FakeWorkerApi(), clock)

    async def vanished(model: str) -> str | None:
        return None

    listed_but_gone.worker_address = vanished  # type: ignore[method-assign]
    with pytest.raises(NoWorker, match="available right now"):
        asyncio.run(gone.route(MODEL))
    with pytest.raises(ControllerUnavailable):
        asyncio.run(router(FakeDirectory(down=True), FakeWorkerApi(), clock).route(MODEL))


def test_requests_reuse_the_route_and_recover_from_a_dead_worker() -> None:
    with fake_api(worker_address_ttl_s=60) as api:
        for _ in range(3):
            assert api.client.post("/v1/chat/completions", json=chat_body()).status_code == 200
        assert api.directory.lookups == [MODEL] and api.workers.described == 1
        # The cached worker dies and another takes over: one fresh lookup, no error.
        api.workers.down.add(ADDRESS)
        api.directory.models[MODEL] = "http://worker-2"
        assert api.client.post("/v1/chat/completions", json=chat_body()).status_code == 200
        assert api.directory.lookups == [MODEL, MODEL]
        # When the fresh worker fails too, the client gets a 503 and the cache is dropped.
        api.workers.down.add("http://worker-2")
        failed = api.client.post("/v1/chat/completions", json=chat_body(stream=True))
        assert failed.status_code == 503
        api.workers.down.clear()
        assert api.client.post("/v1/chat/completions", json=chat_body()).status_code == 200
        assert len(api.directory.lookups) == 4
