"""The API's Ray adapters (adapters/api/ray_fleet) with a fake deployment handle: no Ray."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from vilaserve.adapters.api.ray_fleet.affinity import affinity_key, rendezvous_order
from vilaserve.adapters.api.ray_fleet.fleet import (
    AFFINITY_KWARG,
    RayFleet,
    RayModelDirectory,
    RayWorkerGateway,
    fleet_address,
)
from vilaserve.domain.shared.errors import InvalidRequest, WorkerBusy, WorkerUnavailable

ADDRESS = fleet_address("vilaserve", "VilaWorker")


class BackPressureError(Exception):
    """Named as Ray Serve's: the deployment's queue is full."""


class FakeStream:
    """A streaming DeploymentResponse: `pieces` (bytes) then `then` (an exception) if set."""

    def __init__(self, pieces: list[bytes], then: BaseException | None = None, hang=False):
        self._pieces = pieces
        self._then = then
        self._hang = hang
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        for piece in self._pieces:
            yield piece
        if self._hang:
            await asyncio.Event().wait()
        if self._then is not None:
            raise self._then

    def cancel(self) -> None:
        self.cancelled = True


class FakeReply:
    def __init__(self, value: Any = None, error: BaseException | None = None, hang=False):
        self._value, self._error, self._hang = value, error, hang
        self.cancelled = False

    def __await__(self) -> Any:
        return self._resolve().__await__()

    async def _resolve(self) -> Any:
        if self._hang:
            await asyncio.Event().wait()
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self) -> None:
        self.cancelled = True


class FakeMethod:
    def __init__(self, handle: FakeHandle, name: str) -> None:
        self._handle, self._name = handle, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self._handle.calls.append((self._name, args, kwargs, self._handle.streaming))
        return self._handle.replies[self._name]


class FakeHandle:
    def __init__(self, **replies: Any) -> None:
        self.replies = replies
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any], bool]] = []
        self.streaming = False

    def options(self, stream: bool = False) -> FakeHandle:
        copy = FakeHandle(**self.replies)
        copy.calls, copy.streaming = self.calls, stream
        return copy

    def __getattr__(self, name: str) -> FakeMethod:
        return FakeMethod(self, name)


def gateway(handle: FakeHandle, cache_aware: bool = True, timeout_s: float = 5.0):
    fleet = RayFleet(handle, ADDRESS, ("VILA1.5-3b",), cache_aware)
    return RayWorkerGateway(fleet, timeout_s=timeout_s)


def frame(**fields: Any) -> bytes:
    return json.dumps(fields).encode() + b"\0"


async def collect(stream: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f async for f in stream]


PAYLOAD = {"prompt": "USER: <image>\nhi ASSISTANT:", "images": ["aGVsbG8="], "max_new_tokens": 4}


def test_frames_split_anywhere_arrive_whole_with_the_conversation_key() -> None:
    raw = frame(text="He", error_code=0) + frame(text="Hello", error_code=0, finish_reason="stop")
    stream = FakeStream([raw[:5], raw[5:17], raw[17:]])
    handle = FakeHandle(generate_stream=stream)
    frames = asyncio.run(collect(gateway(handle).stream_generate(ADDRESS, PAYLOAD)))
    assert [f["text"] for f in frames] == ["He", "Hello"]
    name, args, kwargs, streaming = handle.calls[0]
    assert (name, streaming) == ("generate_stream", True)
    assert json.loads(args[0]) == PAYLOAD  # the bytes a worker's HTTP route would read
    assert kwargs[AFFINITY_KWARG] == affinity_key(PAYLOAD) is not None


def test_without_cache_aware_routing_no_key_travels() -> None:
    handle = FakeHandle(generate_stream=FakeStream([frame(text="x", error_code=0)]))
    asyncio.run(collect(gateway(handle, cache_aware=False).stream_generate(ADDRESS, PAYLOAD)))
    assert handle.calls[0][2][AFFINITY_KWARG] is None


def test_a_replica_that_dies_mid_stream_is_a_worker_unavailable() -> None:
    died = RuntimeError("ActorDiedError: the actor died unexpectedly")
    handle = FakeHandle(generate_stream=FakeStream([frame(text="a", error_code=0)], died))
    received: list[dict[str, Any]] = []

    async def run() -> None:
        async for f in gateway(handle).stream_generate(ADDRESS, PAYLOAD):
            received.append(f)

    with pytest.raises(WorkerUnavailable, match="actor died"):
        asyncio.run(run())
    assert [f["text"] for f in received] == ["a"]


def test_a_full_queue_is_busy_not_dead() -> None:
    handle = FakeHandle(generate_stream=FakeStream([], BackPressureError("queue full")))
    with pytest.raises(WorkerBusy):
        asyncio.run(collect(gateway(handle).stream_generate(ADDRESS, PAYLOAD)))


def test_closing_the_stream_early_cancels_the_call() -> None:
    stream = FakeStream([frame(text="a", error_code=0)], hang=True)
    handle = FakeHandle(generate_stream=stream)

    async def run() -> None:
        frames = gateway(handle).stream_generate(ADDRESS, PAYLOAD)
        assert (await anext(frames))["text"] == "a"
        await frames.aclose()  # type: ignore[attr-defined]

    asyncio.run(run())
    assert stream.cancelled


def test_a_silent_replica_times_out() -> None:
    stream = FakeStream([], hang=True)
    handle = FakeHandle(generate_stream=stream)
    with pytest.raises(WorkerUnavailable) as caught:
        asyncio.run(collect(gateway(handle, timeout_s=0.05).stream_generate(ADDRESS, PAYLOAD)))
    assert caught.value.timed_out and stream.cancelled


def test_a_payload_that_is_not_json_is_the_callers_error() -> None:
    handle = FakeHandle(generate_stream=FakeStream([]))
    bad = {"prompt": "\ud800", "max_new_tokens": 1}
    with pytest.raises(InvalidRequest):
        asyncio.run(collect(gateway(handle).stream_generate(ADDRESS, bad)))
    assert handle.calls == []


def test_status_details_and_template_come_from_a_replica() -> None:
    handle = FakeHandle(
        get_status=FakeReply({"model_names": ["VILA1.5-3b"], "speed": 1, "queue_length": 3}),
        model_details=FakeReply({"context_length": 4096, "tokens_per_image": 196}),
        conversation_template=FakeReply({"conv": {"name": "vicuna_v1"}}),
    )
    g = gateway(handle)

    async def run() -> tuple[Any, Any, Any]:
        return (
            await g.get_status(ADDRESS),
            await g.model_details(ADDRESS, "VILA1.5-3b"),
            await g.conversation_template(ADDRESS, "VILA1.5-3b"),
        )

    status, details, conv = asyncio.run(run())
    assert status.queue_length == 3 and status.model_names == ("VILA1.5-3b",)
    assert (details.context_length, details.tokens_per_image, details.multimodal) == (
        4096,
        196,
        True,
    )
    assert conv == {"name": "vicuna_v1"}


def test_a_call_that_fails_or_hangs_is_unavailable_and_cancelled() -> None:
    hanging = FakeReply(hang=True)
    g = gateway(FakeHandle(get_status=hanging, model_details=FakeReply(error=OSError("gone"))))
    with pytest.raises(WorkerUnavailable) as caught:
        asyncio.run(g.get_status(ADDRESS, timeout_s=0.05))
    assert caught.value.timed_out and hanging.cancelled
    with pytest.raises(WorkerUnavailable, match="gone"):
        asyncio.run(g.model_details(ADDRESS, "m"))


def test_an_address_of_another_fleet_is_refused() -> None:
    g = gateway(FakeHandle(model_details=FakeReply({"context_length": 1})))
    with pytest.raises(WorkerUnavailable, match="not this fleet"):
        asyncio.run(g.model_details("http://localhost:21002", "m"))


def test_the_directory_serves_the_fleets_models_at_the_fleets_address() -> None:
    directory = RayModelDirectory(RayFleet(FakeHandle(), ADDRESS, ("VILA1.5-3b",)))
    assert asyncio.run(directory.list_models()) == ["VILA1.5-3b"]
    assert asyncio.run(directory.worker_address("VILA1.5-3b")) == ADDRESS
    assert asyncio.run(directory.worker_address("other")) is None


def test_the_key_is_the_first_pictures_and_nothing_without_one() -> None:
    turn_1 = {"prompt": "a", "images": ["AAAA"]}
    turn_2 = {"prompt": "a b c", "images": ["AAAA", "BBBB"]}
    assert affinity_key(turn_1) == affinity_key(turn_2)
    assert affinity_key({"images": ["CCCC"]}) != affinity_key(turn_1)
    assert affinity_key({"prompt": "text only"}) is None
    assert affinity_key({"images": []}) is None


def test_rendezvous_moves_only_the_keys_of_a_replica_that_leaves() -> None:
    replicas = ["r1", "r2", "r3"]
    keys = [f"key{i}" for i in range(300)]
    before = {k: rendezvous_order(k, replicas)[0] for k in keys}
    after = {k: rendezvous_order(k, ["r1", "r3"])[0] for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "r2"}
    assert set(before.values()) == set(replicas)  # every replica gets some
    assert rendezvous_order("key1", replicas) == rendezvous_order("key1", list(reversed(replicas)))
