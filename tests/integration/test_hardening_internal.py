"""Issue 23's finding 4 ("Hardening, round two"): nothing on the host bypasses the API's keys.

With the stack's internal token (what `vilaserve serve` sets up when the API has keys), the
worker and the controller answer generations, counts and listings only to callers holding it:
the API (which checks users' keys), the controller and `serve`. The worker reads JSON bodies
only, and both answer only to Host names of their own (no DNS rebinding from a web page).
Keys off command lines are `test_hardening_serve.py`'s part.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from servers import registered_worker, start_api

TOKEN = "internal-7f3a"
SECRET = "registration-91c2"
KEY = "user-key-5d0e"
JSON = {"content-type": "application/json"}


def test_the_worker_and_the_controller_serve_only_the_stack_and_their_own_names(
    tiny_vila_siglip: Path,
) -> None:
    guarded = {"internal_token": TOKEN, "registration_secret": SECRET}
    with (
        registered_worker(tiny_vila_siglip, guarded, guarded) as registered,
        start_api(registered.controller_url, api_keys=KEY, internal_token=TOKEN) as api,
    ):
        address, control_url = registered.worker_url, registered.controller_url
        stack = {"authorization": f"Bearer {TOKEN}"}
        model = registered.model
        body = {"model": model, "prompt": "USER: hi ASSISTANT:", "max_new_tokens": 2}

        # A local process without the token: nothing but a refusal.
        for url, path in (
            (address, "/worker_generate_stream"),
            (address, "/worker_generate"),
            (address, "/count_token"),
            (address, "/worker_get_status"),
            (control_url, "/worker_generate_stream"),
            (control_url, "/get_worker_address"),
            (control_url, "/list_models"),
            (control_url, "/refresh_all_workers"),
        ):
            bare = httpx.post(url + path, json=body, timeout=30)
            assert bare.status_code == 401, (path, bare.status_code, bare.content[:200])
            assert bare.json()["error_code"] == 40101, (path, bare.text)
            wrong = httpx.post(
                url + path, json=body, headers={"authorization": "Bearer x"}, timeout=30
            )
            assert wrong.status_code == 401 and wrong.json()["error_code"] == 40102
        assert httpx.get(address + "/health").status_code == 200
        assert httpx.get(control_url + "/test_connection").status_code == 200

        # The stack itself: the controller relays to the worker with the token, and the
        # API serves a key holder end to end.
        relayed = httpx.post(
            control_url + "/worker_generate_stream", json=body, headers=stack, timeout=60
        )
        assert relayed.status_code == 200, relayed.content[:300]
        assert json.loads(relayed.content.split(b"\0")[-2])["error_code"] == 0
        chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        no_key = httpx.post(api.url + "/v1/chat/completions", json={**chat, "max_tokens": 2})
        assert no_key.status_code == 401
        answer = httpx.post(
            api.url + "/v1/chat/completions",
            json={**chat, "max_tokens": 2},
            headers={"authorization": f"Bearer {KEY}"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text

        # A web page can post text/plain (or a type-less blob) without asking: refused.
        for kind in ("text/plain", None):
            headers = {**stack, **({"content-type": kind} if kind else {})}
            posted = httpx.post(
                address + "/worker_generate",
                content=json.dumps(body).encode(),
                headers=headers,
                timeout=30,
            )
            assert posted.status_code == 415, (kind, posted.text)

        # DNS rebinding: a page at attacker.example re-bound to 127.0.0.1 sends its own name.
        for url in (address, control_url):
            rebound = httpx.post(
                url + "/worker_get_status",
                headers={**stack, "host": f"attacker.example:{url.rsplit(':', 1)[1]}"},
            )
            assert rebound.status_code == 400 and "Host" in rebound.json()["text"]
            for name in ("localhost", "127.0.0.1", "[::1]"):
                named = httpx.post(
                    url + "/worker_get_status",
                    headers={**stack, "host": f"{name}:{url.rsplit(':', 1)[1]}"},
                )
                assert named.status_code == 200, (url, name, named.text)
