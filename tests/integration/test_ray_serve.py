"""The workers as Ray Serve replicas on a local two-node cluster (`ray.cluster_utils.Cluster`,
one CPU per node), the OpenAI API in front of them through the Ray adapters, on the tiny random
checkpoint. One cluster for the module; each test deploys the fleet it needs (a deployment whose
options change restarts its replicas). Replicas take one request at a time here
(`max_ongoing_requests=1`), so what runs where follows from the order of events alone."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ray = pytest.importorskip("ray", reason='needs the [ray] extra: pip install -e ".[ray]"')
serve = pytest.importorskip("ray.serve", reason='needs the [ray] extra: pip install -e ".[ray]"')

from PIL import Image  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from servers import ServerThread, wait_for  # noqa: E402

from vilaserve.entrypoints.api.app import create_api_app  # noqa: E402
from vilaserve.entrypoints.api.settings import ApiSettings  # noqa: E402
from vilaserve.entrypoints.ray.app import (  # noqa: E402
    api_container,
    ray_fleet,
    worker_application,
)
from vilaserve.entrypoints.ray.options import APP_NAME, WORKER_DEPLOYMENT, FleetOptions  # noqa: E402

pytestmark = [
    pytest.mark.ray,
    # The autoscaling test looks back 2 s, under Ray's 10 s load reports: fine for a test.
    pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning"),
]

LONG = 400  # tokens: a stream still runs when the test acts on it
REPLICA_START_S = 180.0  # a replica imports torch and loads the model on a busy 2-core box


@dataclass
class TwoNodes:
    cluster: Any
    worker_node: Any
    checkpoint: Path


@pytest.fixture(scope="module")
def two_nodes(tiny_vila_siglip: Path) -> Iterator[TwoNodes]:
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    worker_node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    try:
        yield TwoNodes(cluster, worker_node, tiny_vila_siglip)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@dataclass
class Fleet:
    handle: Any
    url: str
    model: str


@contextmanager
def deployed(nodes: TwoNodes, **options: Any) -> Iterator[Fleet]:
    opts = FleetOptions(
        worker={"model_path": str(nodes.checkpoint), "dtype": "float32"},
        max_ongoing_requests=1,
        health_check_period_s=2.0,
        **options,
    )
    handle = serve.run(worker_application(opts), name=APP_NAME, route_prefix=None)
    app = create_api_app(api_container(ray_fleet(handle, opts), ApiSettings(log_format="text")))
    with ServerThread(app) as api:
        yield Fleet(handle, api.url, opts.model_name)


def running_replicas() -> int:
    app = serve.status().applications.get(APP_NAME)
    deployment = app.deployments.get(WORKER_DEPLOYMENT) if app else None
    return int((deployment.replica_states or {}).get("RUNNING", 0)) if deployment else 0


def replica_actors() -> list[tuple[str, str]]:
    """The worker replicas' actors, by name and namespace."""
    return [
        (actor["name"], actor["namespace"])
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("SERVE_REPLICA::") and WORKER_DEPLOYMENT in actor["name"]
    ]


def picture(seed: int) -> str:
    image = Image.new("RGB", (32, 32), (seed * 40 % 256, 90, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Outcome:
    chunks: int = 0  # text chunks received
    finish: str | None = None
    error: dict[str, Any] | None = None


async def chat(
    client: httpx.AsyncClient,
    fleet: Fleet,
    outcome: Outcome,
    seed: int = 0,
    max_tokens: int = LONG,
    stop_after: int | None = None,
) -> Outcome:
    """One streamed chat request about a picture; `stop_after` chunks: hang up then."""
    body = {
        "model": fleet.model,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": picture(seed)}},
                    {"type": "text", "text": "What is in the picture?"},
                ],
            }
        ],
    }
    async with client.stream("POST", fleet.url + "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200, await reply.aread()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                outcome.error = event["error"]
                continue
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    outcome.chunks += 1
                outcome.finish = choice.get("finish_reason") or outcome.finish
            if stop_after is not None and outcome.chunks >= stop_after:
                return outcome  # leaving the block closes the connection
    return outcome


async def until(condition: Any, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def pair(two_nodes: TwoNodes) -> Iterator[Fleet]:
    """Two replicas, one on each node (one CPU each, one CPU per node)."""
    with deployed(two_nodes, replicas=2) as fleet:
        yield fleet


def test_two_replicas_serve_concurrent_requests(pair: Fleet) -> None:
    async def run() -> list[tuple[str, int]]:
        events: list[tuple[str, int]] = []
        outcomes = [Outcome(), Outcome()]

        async def one(i: int) -> None:
            # Distinct pictures: the router spreads them by load once its choice is full.
            task = asyncio.ensure_future(chat(client, pair, outcomes[i], seed=i))
            await until(lambda: outcomes[i].chunks > 0)
            events.append(("first", i))
            await task
            events.append(("last", i))

        async with httpx.AsyncClient(timeout=300) as client:
            await asyncio.gather(one(0), one(1))
        assert all(o.finish == "length" and o.error is None for o in outcomes), outcomes
        return events

    events = asyncio.run(run())
    # One request at a time per replica: both streams started before either ended only if
    # both replicas served at once.
    assert [kind for kind, _ in events[:2]] == ["first", "first"], events


def test_replica_dying_mid_stream_ends_it_with_an_openai_error_event(pair: Fleet) -> None:
    async def run() -> Outcome:
        outcome = Outcome()
        async with httpx.AsyncClient(timeout=300) as client:
            task = asyncio.ensure_future(chat(client, pair, outcome))
            await until(lambda: outcome.chunks > 0)
            for name, namespace in killed:
                ray.kill(ray.get_actor(name, namespace=namespace))
            return await task

    killed = replica_actors()
    assert len(killed) == 2
    outcome = asyncio.run(run())
    assert outcome.finish is None
    assert outcome.error is not None, outcome
    assert outcome.error["message"] and outcome.error["type"], outcome.error
    # Ray Serve starts two new replicas.
    wait_for(
        lambda: len(set(replica_actors()) - set(killed)) == 2 and running_replicas() == 2,
        timeout=REPLICA_START_S,
    )


def test_a_node_removed_mid_run_loses_no_request_that_had_not_started(
    two_nodes: TwoNodes, pair: Fleet
) -> None:
    wait_for(lambda: running_replicas() == 2, timeout=REPLICA_START_S)

    async def run() -> tuple[list[Outcome], set[int]]:
        outcomes = [Outcome() for _ in range(6)]
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = [
                asyncio.ensure_future(chat(client, pair, o, seed=i)) for i, o in enumerate(outcomes)
            ]
            await until(lambda: sum(o.chunks > 0 for o in outcomes) >= 2)
            started = {i for i, o in enumerate(outcomes) if o.chunks > 0}
            await asyncio.to_thread(two_nodes.cluster.remove_node, two_nodes.worker_node)
            await asyncio.gather(*tasks)
        return outcomes, started

    outcomes, started = asyncio.run(run())
    not_started = [o for i, o in enumerate(outcomes) if i not in started]
    assert len(not_started) == 4
    assert all(o.finish == "length" and o.error is None for o in not_started), outcomes
    # Those that were streaming ended one way or the other (the other node's went on).
    assert all(o.finish or o.error for o in outcomes), outcomes
    # A node joins (as a cluster autoscaler would add one): the lost replica comes back.
    two_nodes.worker_node = two_nodes.cluster.add_node(num_cpus=1)
    wait_for(lambda: running_replicas() == 2, timeout=REPLICA_START_S)


def _generated_tokens(metrics_text: str) -> float:
    found = re.search(r"^vllm:generation_tokens_total (\S+)$", metrics_text, re.MULTILINE)
    assert found, metrics_text[:500]
    return float(found.group(1))


def test_a_client_that_disconnects_frees_its_replica(two_nodes: TwoNodes) -> None:
    with deployed(two_nodes, replicas=1) as fleet:

        async def run() -> tuple[Outcome, Outcome]:
            async with httpx.AsyncClient(timeout=300) as client:
                gone = await chat(client, fleet, Outcome(), stop_after=2)
                after = await chat(client, fleet, Outcome(), max_tokens=4)
            return gone, after

        gone, after = asyncio.run(run())
        assert gone.finish is None and after.finish == "length", (gone, after)
        tokens = _generated_tokens(fleet.handle.metrics.remote().result())
        # One request at a time: had the first run on, the second would have waited for its
        # LONG tokens.
        assert tokens < LONG, tokens


def test_autoscaling_goes_from_one_replica_to_two_under_load_and_back(
    two_nodes: TwoNodes,
) -> None:
    scaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1.0,
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 2.0,
        "look_back_period_s": 2.0,
    }
    with deployed(two_nodes, **scaling) as fleet:
        wait_for(lambda: running_replicas() == 1, timeout=REPLICA_START_S)

        async def load_until_two() -> None:
            async with httpx.AsyncClient(timeout=300) as client:
                while running_replicas() < 2:
                    batch = [chat(client, fleet, Outcome(), seed=i) for i in range(4)]
                    outcomes = await asyncio.gather(*batch)
                    assert all(o.error is None for o in outcomes), outcomes

        asyncio.run(asyncio.wait_for(load_until_two(), REPLICA_START_S * 2))
        wait_for(lambda: running_replicas() == 1, timeout=REPLICA_START_S)
