"""Worker routing and its caches: at most one controller lookup per request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from api_fakes import ADDRESS, MODEL, FakeDirectory, FakeWorkerGateway, chat_body, fake_api

from vilaserve.adapters.api.model_directory import HttpModelDirectory
from vilaserve.application.api.model_router import ModelRouter
from vilaserve.domain.api.errors import ModelNotFound, NoWorker
from vilaserve.domain.shared.errors import ControllerUnavailable, WorkerUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def router(directory: FakeDirectory, workers: FakeWorkerGateway, clock: Clock) -> ModelRouter:
    return ModelRouter(directory, workers, address_ttl_s=5, info_ttl_s=60, clock=clock)


def test_addresses_are_cached_briefly_and_model_facts_longer() -> None:
    directory, workers, clock = FakeDirectory(), FakeWorkerGateway(), Clock()
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
    directory, workers, clock = FakeDirectory(), FakeWorkerGateway(), Clock()
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
    routes = router(directory, FakeWorkerGateway(), clock)
    with pytest.raises(ModelNotFound, match=r"available: VILA1\.5-3b"):
        asyncio.run(routes.route("nope"))
    empty = router(FakeDirectory(models={}), FakeWorkerGateway(), clock)
    with pytest.raises(NoWorker, match="no model worker is registered"):
        asyncio.run(empty.route(MODEL))
    listed_but_gone = FakeDirectory(models={MODEL: ADDRESS})
    gone = router(listed_but_gone, FakeWorkerGateway(), clock)

    async def vanished(model: str) -> str | None:
        return None

    listed_but_gone.worker_address = vanished  # type: ignore[method-assign]
    with pytest.raises(NoWorker, match="available right now"):
        asyncio.run(gone.route(MODEL))
    with pytest.raises(ControllerUnavailable):
        asyncio.run(router(FakeDirectory(down=True), FakeWorkerGateway(), clock).route(MODEL))


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
        # When the fresh worker fails too, the client gets a 503 after one failover (one more
        # lookup, which names the same dead worker), and the model's facts are dropped.
        api.workers.down.add("http://worker-2")
        failed = api.client.post("/v1/chat/completions", json=chat_body(stream=True))
        assert failed.status_code == 503
        assert len(api.directory.lookups) == 3 and api.directory.refreshes == 2
        api.workers.down.clear()
        assert api.client.post("/v1/chat/completions", json=chat_body()).status_code == 200
        assert len(api.directory.lookups) == 3 and api.workers.described == 3


def named_in_turn(directory: FakeDirectory, *addresses: str) -> None:
    """The directory names these workers, one lookup after the other."""
    named = iter(addresses)

    async def next_worker(model: str) -> str | None:
        directory.lookups.append(model)
        return next(named)

    directory.worker_address = next_worker  # type: ignore[method-assign]


def test_a_worker_that_cannot_describe_its_model_is_failed_over_once() -> None:
    directory, workers = FakeDirectory(), FakeWorkerGateway(down={"http://dead-1", "http://dead-2"})
    named_in_turn(directory, "http://dead-1", "http://dead-2", ADDRESS)
    with pytest.raises(WorkerUnavailable, match="dead-2"):
        asyncio.run(router(directory, workers, Clock()).route(MODEL))
    assert len(directory.lookups) == 2 and directory.refreshes == 1  # ADDRESS never asked


class StreamsFail(FakeWorkerGateway):
    """Workers in `no_streams` describe their model but cannot start a generation."""

    def __init__(self, no_streams: set[str]) -> None:
        super().__init__()
        self.no_streams = no_streams

    async def stream_generate(
        self, address: str, payload: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        if address in self.no_streams:
            raise WorkerUnavailable(address, "connection refused")
        async for frame in super().stream_generate(address, payload):
            yield frame


def test_a_second_unreachable_worker_is_not_failed_over_again() -> None:
    # The first worker dies between its description and the streams; the controller then
    # names a second one that is dead too: 503, and a third worker is never tried.
    directory = FakeDirectory()
    with fake_api(directory=directory, workers=StreamsFail({ADDRESS})) as api:
        named_in_turn(directory, ADDRESS, "http://dead-2", "http://worker-3")
        api.workers.down.add("http://dead-2")
        response = api.client.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 503 and "dead-2" in response.json()["error"]["message"]
        assert len(directory.lookups) == 2 and directory.refreshes == 1
        assert not api.workers.payloads
    # A route that already failed over (its first worker could not describe the model) is
    # not failed over again when its streams cannot start.
    directory = FakeDirectory()
    workers = StreamsFail({"http://worker-2"})
    workers.down.add("http://dead-1")
    with fake_api(directory=directory, workers=workers) as api:
        named_in_turn(directory, "http://dead-1", "http://worker-2", "http://worker-3")
        response = api.client.post("/v1/chat/completions", json=chat_body(stream=True))
        assert response.status_code == 503 and "worker-2" in response.json()["error"]["message"]
        assert len(directory.lookups) == 2 and directory.refreshes == 1
        assert api.container.admission().active == 0


def test_the_controller_is_asked_to_check_its_workers_after_an_unreachable_one() -> None:
    # FastChat's controller (and ours) cannot be told which worker failed: the report is a
    # `/refresh_all_workers`, which drops every worker that does not answer its status.
    sent: list[tuple[str, bytes]] = []

    def controller(request: httpx.Request) -> httpx.Response:
        sent.append((request.url.path, request.content))
        return httpx.Response(200, json=None)

    def controller_down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    async def refresh(transport: httpx.MockTransport) -> None:
        directory = HttpModelDirectory("http://ctl:21001")
        await directory.aclose()
        directory._client = httpx.AsyncClient(transport=transport)
        try:
            await directory.refresh_workers()
        finally:
            await directory.aclose()

    asyncio.run(refresh(httpx.MockTransport(controller)))
    assert sent == [("/refresh_all_workers", b"{}")]
    asyncio.run(refresh(httpx.MockTransport(controller_down)))  # the request fails over anyway
