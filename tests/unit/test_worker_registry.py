"""The controller's registry and dispatch rules, with a fake clock and a scripted random source."""

from __future__ import annotations

import socket
from collections.abc import Iterable

import pytest

from vilaserve.domain.controller.worker_registry import DispatchMethod, ModelKind, WorkerRegistry
from vilaserve.domain.shared.controller_messages import (
    parse_heartbeat,
    parse_registration,
    parse_worker_status,
    requested_model,
    worker_identity,
)
from vilaserve.domain.shared.errors import InvalidRequest
from vilaserve.domain.shared.worker_status import WorkerStatus

SHORTEST = DispatchMethod.SHORTEST_QUEUE
LOTTERY = DispatchMethod.LOTTERY


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedRandom:
    def __init__(self, values: Iterable[float]) -> None:
        self._values = iter(values)

    def random(self) -> float:
        return next(self._values)


def status(*models: str, speed: float = 1, queue: int = 0) -> WorkerStatus:
    return WorkerStatus(models, speed, queue)


def registry(clock: FakeClock, expiration: float = 30.0, rng: object = None) -> WorkerRegistry:
    return WorkerRegistry(expiration, clock=clock, rng=rng)  # type: ignore[arg-type]


def test_lists_models_by_kind_sorted_and_deduplicated() -> None:
    reg = registry(FakeClock())
    reg.register("http://a", status("vila-3b", "vila-8b"), multimodal=True, check_heart_beat=True)
    reg.register("http://b", status("vila-3b"), multimodal=True, check_heart_beat=True)
    reg.register("http://c", status("llama"), multimodal=False, check_heart_beat=True)
    assert reg.model_names() == ["llama", "vila-3b", "vila-8b"]
    assert reg.model_names(ModelKind.MULTIMODAL) == ["vila-3b", "vila-8b"]
    assert reg.model_names(ModelKind.LANGUAGE) == ["llama"]


def test_heartbeats_keep_a_worker_alive_and_silence_expires_it() -> None:
    clock = FakeClock()
    reg = registry(clock, expiration=30)
    reg.register("http://a", status("m"), multimodal=True, check_heart_beat=True)
    reg.register("http://b", status("m"), multimodal=True, check_heart_beat=True)
    clock.now += 20
    assert reg.heartbeat("http://a", queue_length=0) is True
    clock.now += 20  # a: 20 s since its beat; b: 40 s of silence
    assert [r.address for r in reg.live_workers()] == ["http://a"]
    assert [reg.pick("m", SHORTEST) for _ in range(3)] == ["http://a"] * 3
    assert [r.address for r in reg.expire()] == ["http://b"]
    assert reg.addresses() == ["http://a"]
    assert reg.heartbeat("http://b", queue_length=0) is False  # must register again
    clock.now += 31
    assert reg.model_names() == [] and reg.pick("m", LOTTERY) is None


def test_a_heartbeat_after_expiry_is_refused_even_before_the_sweep() -> None:
    clock = FakeClock()
    reg = registry(clock, expiration=30)
    reg.register("http://a", status("m"), multimodal=True, check_heart_beat=True)
    clock.now += 31
    assert reg.heartbeat("http://a", queue_length=0) is False
    assert reg.addresses() == []


def test_workers_registered_without_heartbeat_checks_never_expire() -> None:
    clock = FakeClock()
    reg = registry(clock, expiration=30)
    reg.register("http://nested", status("m"), multimodal=True, check_heart_beat=False)
    clock.now += 10_000
    assert reg.expire() == [] and reg.pick("m", SHORTEST) == "http://nested"


def test_unknown_worker_heartbeat_says_register_again() -> None:
    assert registry(FakeClock()).heartbeat("http://nobody", 0) is False


def test_shortest_queue_picks_least_queue_per_speed_and_counts_its_picks() -> None:
    reg = registry(FakeClock())
    reg.register("http://a", status("m", queue=3), multimodal=True, check_heart_beat=True)
    reg.register("http://b", status("m", queue=1), multimodal=True, check_heart_beat=True)
    reg.register("http://other", status("x"), multimodal=True, check_heart_beat=True)
    # b goes from 1 to 2 to 3 queued; then a and b tie at 3 and the one chosen less recently
    # (a, never) goes next; a now has 4, so b again.
    picks = [reg.pick("m", SHORTEST) for _ in range(4)]
    assert picks == ["http://b", "http://b", "http://a", "http://b"]
    reg.heartbeat("http://a", queue_length=0)  # the heartbeat replaces the counted picks
    assert reg.pick("m", SHORTEST) == "http://a"


def test_shortest_queue_weighs_queue_by_speed() -> None:
    reg = registry(FakeClock())
    reg.register(
        "http://fast", status("m", speed=4, queue=6), multimodal=True, check_heart_beat=True
    )
    reg.register(
        "http://slow", status("m", speed=1, queue=2), multimodal=True, check_heart_beat=True
    )
    assert reg.pick("m", SHORTEST) == "http://fast"  # 6/4 = 1.5 < 2/1


def test_idle_workers_take_turns_under_shortest_queue() -> None:
    reg = registry(FakeClock())
    for address in ("http://a", "http://b", "http://c"):
        reg.register(address, status("m"), multimodal=True, check_heart_beat=True)
    picks = []
    for _ in range(6):
        picks.append(reg.pick("m", SHORTEST))
        for address in ("http://a", "http://b", "http://c"):
            reg.heartbeat(address, queue_length=0)  # idle again before the next request
    assert picks == ["http://a", "http://b", "http://c"] * 2


def test_lottery_draws_in_proportion_to_speed() -> None:
    # Weights 1 and 3 split [0, 1) at 0.25.
    rng = ScriptedRandom([0.0, 0.24, 0.25, 0.99])
    reg = registry(FakeClock(), rng=rng)
    reg.register("http://slow", status("m", speed=1), multimodal=True, check_heart_beat=True)
    reg.register("http://fast", status("m", speed=3), multimodal=True, check_heart_beat=True)
    picks = [reg.pick("m", LOTTERY) for _ in range(4)]
    assert picks == ["http://slow", "http://slow", "http://fast", "http://fast"]


def test_lottery_skips_zero_speed_workers_unless_all_are_zero() -> None:
    reg = registry(FakeClock(), rng=ScriptedRandom([0.0, 0.0, 0.99]))
    reg.register("http://stalled", status("m", speed=0), multimodal=True, check_heart_beat=True)
    reg.register("http://ok", status("m", speed=1), multimodal=True, check_heart_beat=True)
    assert reg.pick("m", LOTTERY) == "http://ok"
    reg.remove("http://ok")
    reg.register("http://zero", status("m", speed=0), multimodal=True, check_heart_beat=True)
    assert [reg.pick("m", LOTTERY) for _ in range(2)] == ["http://stalled", "http://zero"]


def test_lottery_spreads_with_a_real_random_source() -> None:
    import random

    reg = registry(FakeClock(), rng=random.Random(7))
    reg.register("http://a", status("m"), multimodal=True, check_heart_beat=True)
    reg.register("http://b", status("m"), multimodal=True, check_heart_beat=True)
    picks = [reg.pick("m", LOTTERY) for _ in range(200)]
    assert 70 < picks.count("http://a") < 130


def test_aggregate_status_sums_live_workers_for_a_parent_controller() -> None:
    clock = FakeClock()
    reg = registry(clock, expiration=30)
    reg.register("http://a", status("b-model", queue=2), multimodal=True, check_heart_beat=True)
    reg.register("http://b", status("a-model", queue=3), multimodal=False, check_heart_beat=True)
    assert reg.aggregate_status() == WorkerStatus(("a-model", "b-model"), 2, 5)
    clock.now += 31
    assert reg.aggregate_status() == WorkerStatus((), 0, 0)


def test_re_registering_a_live_worker_takes_only_its_status() -> None:
    clock = FakeClock()
    reg = registry(clock, expiration=30)
    reg.register("http://127.0.0.1:1", status("old"), multimodal=True, check_heart_beat=True)
    kept = reg.register(
        "http://localhost:1", status("new"), multimodal=False, check_heart_beat=False
    )
    assert (kept.address, kept.multimodal, kept.check_heart_beat) == (
        "http://127.0.0.1:1",
        True,
        True,
    )
    assert reg.model_names(ModelKind.MULTIMODAL) == ["new"]
    assert reg.addresses() == ["http://127.0.0.1:1"]
    clock.now += 31  # its check stayed on: it expires
    assert reg.model_names() == []


def test_a_registration_after_expiry_replaces_what_was_known() -> None:
    clock = FakeClock()
    reg = registry(clock, expiration=30)
    reg.register("http://a", status("old"), multimodal=False, check_heart_beat=True)
    clock.now += 31
    assert reg.live_address("http://a") is None and reg.is_registered("http://a")
    reg.register("http://a", status("new"), multimodal=True, check_heart_beat=True)
    assert reg.model_names() == ["new"] and reg.model_names(ModelKind.LANGUAGE) == []
    assert reg.live_address("http://a:80/") == "http://a"


def test_every_spelling_of_a_workers_address_is_one_worker() -> None:
    reg = registry(FakeClock())
    reg.register("http://127.0.0.1:21002", status("m"), multimodal=True, check_heart_beat=True)
    for alias in ("http://localhost:21002", "http://127.1:21002", "https://[::1]:21002"):
        reg.register(alias, status("m"), multimodal=False, check_heart_beat=False)
        assert reg.heartbeat(alias, queue_length=0)
    assert reg.addresses() == ["http://127.0.0.1:21002"]
    assert {reg.pick("m", SHORTEST) for _ in range(4)} == {"http://127.0.0.1:21002"}
    assert reg.remove("http://0x7f000001:21002") and reg.addresses() == []


@pytest.mark.parametrize(
    ("spellings", "identity"),
    [
        (
            [
                "http://127.0.0.1:8",
                "http://127.0.0.01:8",
                "http://127.1:8",
                "http://0x7f.0.0.1:8",
                "http://0177.0.0.1:8",
                "http://2130706433:8",
                "http://127.0.1.2:8",
                "http://0.0.0.0:8",
                "http://0:8",
                "http://localhost:8",
                "http://LocalHost.:8",
                "http://w.localhost:8",
                "http://[::1]:8",
                "http://[0:0::1]:8",
                "http://[::]:8",
                "http://[::ffff:127.0.0.1]:8",
                "http://[::ffff:7f00:1]:8",
                "https://127.0.0.1:00008/",
            ],
            "127.0.0.1:8",
        ),
        (
            ["http://10.0.0.5", "http://10.0.0.5:80/", "http://012.0.0.5", "http://10.5"],
            "10.0.0.5:80",
        ),
        (["https://gpu-box", "https://GPU-box.:443", "http://gpu-box:443"], "gpu-box:443"),
        (["http://[2001:DB8::1]:9", "http://[2001:db8:0::0:1]:9"], "[2001:db8::1]:9"),
        (["http://[::ffff:10.0.0.5]:9", "http://10.0.0.5:9"], "10.0.0.5:9"),
    ],
)
def test_worker_identity_reads_hosts_as_the_resolver_does(
    spellings: list[str], identity: str
) -> None:
    assert {worker_identity(s) for s in spellings} == {identity}


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.01",
        "127.1",
        "0x7f.0.0.1",
        "0X7F.1",
        "0177.0.0.1",
        "2130706433",
        "10.0.0.010",
        "1.2.3",
        "0",
        "255.255.255.255",
        "4294967295",
        "0xffffffff",
        "1.0xffffff",
        "1.2.0xffff",
        "1.2.3.4.5",
        "256.1.1.1",
        "1.2.3.256",
        "4294967296",
        "1.0x1000000",
        "08.1.1.1",
        "0x",
        "1..2",
        "1.2.3.",
        "gpu-box",
        "a1.b2",
    ],
)
def test_numeric_hosts_are_read_as_inet_aton_reads_them(host: str) -> None:
    try:
        expected = socket.inet_ntoa(socket.inet_aton(host)) + ":1"
    except OSError:  # not an address for the C library: a name, kept as written
        expected = host.lower().removesuffix(".") + ":1"
    if expected.startswith(("127.", "0.0.0.0:")):  # loopback or unspecified: this machine
        expected = "127.0.0.1:1"
    assert worker_identity(f"http://{host}:1") == expected


def test_worker_names_with_an_impossible_port_or_address_are_refused() -> None:
    for name in ("http://h:0", "http://h:65536", "http://[1::2::3]:1", "http://[::1.2.3.04]:1"):
        with pytest.raises(InvalidRequest, match="bare http"):
            parse_registration({"worker_name": name})


def test_expiration_must_be_positive() -> None:
    with pytest.raises(ValueError, match="expiration"):
        WorkerRegistry(0)


def test_parses_fastchat_and_tinychat_registrations() -> None:
    fastchat = parse_registration(
        {
            "worker_name": "http://10.0.0.5:21002/",
            "check_heart_beat": True,
            "worker_status": {"model_names": ["vila"], "speed": 1, "queue_length": 0},
            "multimodal": True,
        }
    )
    assert fastchat.worker_name == "http://10.0.0.5:21002"
    assert fastchat.worker_status == WorkerStatus(("vila",), 1, 0) and fastchat.multimodal
    # TinyChat / LLaVA workers send no `multimodal`; a status of null means "ask me".
    tinychat = parse_registration(
        {"worker_name": "http://h:1", "check_heart_beat": True, "worker_status": None}
    )
    assert tinychat.worker_status is None and not tinychat.multimodal
    assert parse_heartbeat({"worker_name": "http://h:1", "queue_length": 2}).queue_length == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "must be a JSON object"),
        ({"worker_name": "h:1"}, "'worker_name' must be the worker's bare http(s) URL"),
        ({"worker_name": "http://h", "check_heart_beat": "yes"}, "'check_heart_beat'"),
        ({"worker_name": "http://h", "worker_status": {"model_names": "m"}}, "'model_names'"),
        (
            {"worker_name": "http://h", "worker_status": {"model_names": ["m"], "speed": -1}},
            "'speed' must be a finite number >= 0",
        ),
        (
            {
                "worker_name": "http://h",
                "worker_status": {"model_names": ["m"], "queue_length": 1.5},
            },
            "'queue_length' must be an integer >= 0",
        ),
    ],
)
def test_malformed_registrations_name_the_problem(body: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_registration(body)


def test_malformed_status_heartbeat_and_model_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="'queue_length'"):
        parse_heartbeat({"worker_name": "http://h", "queue_length": -1})
    with pytest.raises(InvalidRequest, match="must be a JSON object"):
        parse_worker_status("busy")
    with pytest.raises(InvalidRequest, match="'model' \\(a non-empty string\\) is required"):
        requested_model({"prompt": "hi"})
