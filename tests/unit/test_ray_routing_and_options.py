"""The Ray entrypoint's pieces that need no cluster: the request router's choice (with fake
replicas), the fleet options, the replica-state log line, and `serve --ray` without Ray."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from vilaserve.entrypoints import serve as serve_command
from vilaserve.entrypoints.ray.options import FleetOptions, fleet_options
from vilaserve.entrypoints.ray.replica_states import ReplicaStateLog, replica_summary


@dataclass(frozen=True)
class FakeReplicaId:
    unique_id: str


@dataclass
class FakeReplica:
    name: str

    @property
    def replica_id(self) -> FakeReplicaId:
        return FakeReplicaId(self.name)


@dataclass
class FakeRoutingContext:
    should_backoff: bool = False


@dataclass
class FakePendingRequest:
    kwargs: dict[str, Any]
    args: list[Any] = field(default_factory=list)
    routing_context: FakeRoutingContext = field(default_factory=FakeRoutingContext)


def affinity_router(queue_lengths: dict[str, int], imbalance_limit: int = 4) -> Any:
    pytest.importorskip("ray.serve", reason='needs the [ray] extra: pip install -e ".[ray]"')
    from vilaserve.adapters.api.ray_fleet.request_router import ConversationAffinityRouter

    # Only what choose_replicas reads: Ray Serve's own constructor wants a running cluster.
    router = object.__new__(ConversationAffinityRouter)
    router.initialize_state(imbalance_limit=imbalance_limit)
    lengths = {FakeReplicaId(n): q for n, q in queue_lengths.items()}
    router._replica_queue_len_cache = lengths  # read through `replica_queue_len_cache.get`
    return router


REPLICAS = [FakeReplica("a"), FakeReplica("b"), FakeReplica("c")]


def choose(router: Any, key: str | None) -> tuple[list[list[FakeReplica]], FakePendingRequest]:
    pending = FakePendingRequest({"affinity_key": key})
    return asyncio.run(router.choose_replicas(REPLICAS, pending)), pending


def test_a_conversation_goes_to_its_replica_first_then_to_any() -> None:
    router = affinity_router({})
    first, pending = choose(router, "picture-1")
    again, _ = choose(router, "picture-1")
    assert len(first) == 2 and len(first[0]) == 1
    assert first[0] == again[0]  # the same replica for turn 2
    assert sorted(r.name for r in first[1]) == ["a", "b", "c"]  # the fallback: every replica
    assert pending.routing_context.should_backoff
    homes = {choose(router, f"picture-{i}")[0][0][0].name for i in range(30)}
    assert homes == {"a", "b", "c"}  # conversations spread over the replicas


def test_a_replica_far_behind_the_others_loses_its_preference() -> None:
    home = choose(affinity_router({}), "picture-1")[0][0][0].name
    lengths = {r.name: 0 for r in REPLICAS} | {home: 5}
    ranks, _ = choose(affinity_router(lengths, imbalance_limit=4), "picture-1")
    assert len(ranks) == 1 and len(ranks[0]) == 3  # by load alone
    ranks, _ = choose(affinity_router(lengths, imbalance_limit=5), "picture-1")
    assert ranks[0][0].name == home


def test_a_request_without_a_picture_goes_by_the_power_of_two_choices() -> None:
    ranks, _ = choose(affinity_router({}), None)
    assert len(ranks) == 1 and len(ranks[0]) == 2 and ranks[0][0] != ranks[0][1]


def test_two_calls_made_while_one_request_is_handled_each_get_their_replica() -> None:
    # Ray Serve gives both calls the id of the request being handled (the ingress describing
    # the model: details and template at once); each must get the replica found for it.
    router = affinity_router({})
    router._record_queue_wait_time = lambda pending: None
    router._remove_pending_request_from_indices = lambda pending: None
    loop = asyncio.new_event_loop()
    try:
        calls = [
            SimpleNamespace(metadata=SimpleNamespace(internal_request_id="same")) for _ in range(2)
        ]
        for call in calls:
            call.future = loop.create_future()
        router._pending_requests_to_fulfill = deque(calls)
        router._fulfill_next_pending_request(REPLICAS[1], calls[1].metadata)
        router._fulfill_next_pending_request(REPLICAS[0], calls[0].metadata)
        assert [c.future.result() for c in calls] == [REPLICAS[0], REPLICAS[1]]
    finally:
        loop.close()


def test_builder_args_become_checked_options() -> None:
    options = fleet_options(
        {
            "model_path": "/models/VILA1.5-3b",
            "precision": "W4A16",
            "min_replicas": "1",
            "max_replicas": 4,
            "replica_cpus": "2",
            "replica_gpus": 0.5,
            "cache_aware": "false",
        }
    )
    assert options.model_name == "VILA1.5-3b-4bit-AWQ"
    assert options.ray_actor_options() == {"num_cpus": 2.0, "num_gpus": 0.5}
    scaling = options.autoscaling_config()
    assert scaling is not None
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 4)
    assert not options.cache_aware
    assert fleet_options({"model_path": "/m", "replicas": 3}).autoscaling_config() is None


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        ({}, "model_path is required"),
        ({"model_path": "/m", "replicas": 0}, "replicas must be 1 or more"),
        ({"model_path": "/m", "min_replicas": 3, "max_replicas": 2}, "min_replicas"),
        ({"model_path": "/m", "replica_cpus": "many"}, "replica_cpus"),
        ({"model_path": "/m", "replica": 2}, "unknown argument"),
    ],
)
def test_builder_args_that_make_no_sense_are_refused(args: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        fleet_options(args)


@dataclass
class Deployment:
    status: str
    replica_states: dict[str, int]
    message: str = ""


@dataclass
class Application:
    status: str
    deployments: dict[str, Deployment]


@dataclass
class Status:
    applications: dict[str, Application]


def status(**states: int) -> Status:
    deployment = Deployment("UPDATING" if "STARTING" in states else "HEALTHY", states)
    return Status({"vilaserve": Application("RUNNING", {"VilaWorker": deployment})})


def test_the_replica_states_are_said_once_per_change() -> None:
    said: list[str] = []
    statuses = iter(
        [status(STARTING=2), status(STARTING=2), status(RUNNING=1, STARTING=1), status(RUNNING=2)]
    )
    log = ReplicaStateLog(lambda: next(statuses), "vilaserve", "VilaWorker", said.append)
    for _ in range(4):
        log.check()
    assert said == [
        "replicas: 2 starting (updating)",
        "replicas: 1 running, 1 starting (updating)",
        "replicas: 2 running (healthy)",
    ]
    assert replica_summary(Status({}), "vilaserve", "VilaWorker") == "not deployed"


def test_serve_with_ray_but_without_ray_installed_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    parser = argparse.ArgumentParser()
    serve_command.add_serve_arguments(parser)
    args = parser.parse_args(["--model-path", "/m", "--ray", "auto", "--replicas", "2"])
    assert serve_command.run_serve(args) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ['vilaserve serve: serve --ray needs Ray Serve: pip install -e ".[ray]"']


def test_serve_without_ray_flags_keeps_the_controller_mode_defaults() -> None:
    parser = argparse.ArgumentParser()
    serve_command.add_serve_arguments(parser)
    args = parser.parse_args(["--model-path", "/m"])
    assert args.ray is None and args.replicas == 1 and args.cache_aware
    assert FleetOptions(worker={"model_path": "/m"}).replicas == 1


def test_the_application_builder_puts_the_api_in_front_of_the_replicas_it_asks_for() -> None:
    pytest.importorskip("ray.serve", reason='needs the [ray] extra: pip install -e ".[ray]"')
    from vilaserve.entrypoints.ray.app import build_app

    args = {"model_path": "/m/VILA1.5-3b", "min_replicas": 1, "max_replicas": 3}
    app = build_app({**args, "replica_cpus": 2, "replica_gpus": 1})
    # Ray Serve keeps the bound deployments on the Application (no public reader).
    api = app._bound_deployment
    workers = api.init_args[0]._bound_deployment
    assert (api.name, workers.name) == ("VilaApi", "VilaWorker")
    assert workers.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 1.0}
    config = workers._deployment_config
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (
        1,
        3,
    )
    assert config.request_router_config.request_router_class.endswith("ConversationAffinityRouter")
    plain = (
        build_app({**args, "cache_aware": False})
        ._bound_deployment.init_args[0]
        ._bound_deployment._deployment_config
    )
    assert "ConversationAffinityRouter" not in plain.request_router_config.request_router_class
