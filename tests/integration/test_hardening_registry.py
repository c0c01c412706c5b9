"""Issue 23's finding 9 ("Hardening, round two") against real services on loopback.

9. with the registration secret, re-registering a live worker's address changes nothing but
   what the worker itself reports: not `multimodal`, not `check_heart_beat`; other spellings of
   its address (`localhost`, `127.0.0.01`, `127.1`, `[::ffff:127.0.0.1]`, ...) are the same
   worker, never a second one; the API's remote-image filter sees through the IPv6 forms that
   carry an IPv4 address (NAT64, IPv4-mapped, IPv4-compatible, 6to4).

Each test starts and stops its own servers.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import (
    Registered,
    free_port,
    registered_worker,
    start_api,
    start_controller,
    start_worker,
    wait_for,
)

from vilaserve.domain.api.errors import BadRequest
from vilaserve.domain.api.remote_images import RemoteImagePolicy

SECRET = "s3cret"
AUTH = {"authorization": f"Bearer {SECRET}"}


def listed(controller_url: str, kind: str = "models") -> list[str]:
    names: list[str] = httpx.post(f"{controller_url}/list_{kind}").json()["models"]
    return names


def register(controller_url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(controller_url + "/register_worker", json=body, headers=AUTH, timeout=30)


def live_worker(checkpoint: Path, **controller: object) -> AbstractContextManager[Registered]:
    """The real controller (with the secret) and one real worker registered with it."""
    secret = {"registration_secret": SECRET}
    return registered_worker(checkpoint, {**secret, **controller}, secret)


def test_re_registering_a_live_worker_keeps_it_multimodal(tiny_vila_siglip: Path) -> None:
    with live_worker(tiny_vila_siglip) as live:
        claims = {"worker_name": live.worker_url, "multimodal": False, "check_heart_beat": True}
        assert register(live.controller_url, claims).status_code == 200
        assert listed(live.controller_url, "multimodal_models") == [live.model]
        assert listed(live.controller_url, "language_models") == []


def test_re_registering_a_live_worker_cannot_exempt_it_from_heartbeats(
    tiny_vila_siglip: Path,
) -> None:
    # A worker registered by hand, which never beats: it must expire unless the registration
    # that follows could switch its heartbeat check off.
    with (
        start_controller(registration_secret=SECRET, heart_beat_expiration=1.0) as control,
        start_worker(tiny_vila_siglip) as worker,
    ):
        first = {"worker_name": worker.url, "multimodal": True, "check_heart_beat": True}
        assert register(control.url, first).status_code == 200
        assert listed(control.url) == [tiny_vila_siglip.name]
        again = {**first, "check_heart_beat": False}
        assert register(control.url, again).status_code == 200
        try:
            wait_for(lambda: listed(control.url) == [], timeout=5.0)
        except AssertionError:
            raise AssertionError(
                "the worker never expired: the body switched its check off"
            ) from None


def test_other_spellings_of_a_live_workers_address_are_the_same_worker(
    tiny_vila_siglip: Path,
) -> None:
    with live_worker(tiny_vila_siglip) as live:
        own = httpx.post(live.worker_url + "/worker_get_status").json()
        status = {"model_names": [live.model], "speed": 1, "queue_length": 0}
        for host in (
            "localhost",
            "LOCALHOST.",
            "127.0.0.01",
            "127.1",
            "0x7f.0.0.1",
            "2130706433",
            "[::ffff:127.0.0.1]",
            "[::1]",
            "0.0.0.0",
        ):
            alias = {"worker_name": f"http://{host}:{live.port}/", "worker_status": status}
            assert register(live.controller_url, alias).status_code == 200, host
        # One worker: the controller's sum over its workers is that worker's own status, and
        # every request goes to the address the worker registered itself with.
        total = httpx.post(live.controller_url + "/worker_get_status").json()
        assert total["speed"] == own["speed"], (total, own)
        picked = {
            httpx.post(
                live.controller_url + "/get_worker_address", json={"model": live.model}
            ).json()["address"]
            for _ in range(12)
        }
        assert picked == {live.worker_url}
        # The worker still serves through the controller.
        body = {"model": live.model, "prompt": "USER: hi ASSISTANT:", "max_new_tokens": 2}
        served = httpx.post(live.controller_url + "/worker_generate_stream", json=body, timeout=60)
        last = json.loads([part for part in served.content.split(b"\0") if part][-1])
        assert served.status_code == 200 and last["error_code"] == 0, served.text


NOT_PUBLIC_EMBEDDINGS = (
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254 (cloud metadata)
    "64:ff9b:1::a00:1",  # local-use NAT64 (RFC 8215)
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:0:a00:1",  # IPv4-translated (SIIT)
    "::7f00:1",  # IPv4-compatible 127.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
)


def test_the_remote_image_filter_refuses_ipv4_embedded_in_ipv6(tiny_vila_siglip: Path) -> None:
    with (
        live_worker(tiny_vila_siglip) as live,
        start_api(live.controller_url, allow_remote_images=True) as api,
    ):
        for address in NOT_PUBLIC_EMBEDDINGS:
            body = {
                "model": live.model,
                "max_tokens": 2,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "?"},
                            {
                                "type": "image_url",
                                "image_url": {"url": f"http://[{address}]:{free_port()}/x.png"},
                            },
                        ],
                    }
                ],
            }
            refused = httpx.post(api.url + "/v1/chat/completions", json=body, timeout=30)
            assert refused.status_code == 400, (address, refused.text)
            message = refused.json()["error"]["message"]
            assert "not a public address" in message and "public hosts only" in message, (
                address,
                message,
            )


@pytest.mark.parametrize(
    "address", ["64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8", "93.184.216.34"]
)
def test_public_ipv4_behind_the_ipv6_forms_is_still_fetched(address: str) -> None:
    RemoteImagePolicy().check_addresses("h", [address], "image URL")


@pytest.mark.parametrize("address", NOT_PUBLIC_EMBEDDINGS)
def test_the_policy_refuses_every_embedding_of_a_private_ipv4(address: str) -> None:
    with pytest.raises(BadRequest, match="not a public address"):
        RemoteImagePolicy().check_addresses("h", ["93.184.216.34", address], "image URL")
