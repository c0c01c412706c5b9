"""Issue 15's findings ("Hardening") against real services on loopback: a tiny random VILA
checkpoint behind real workers, the real controller and the real API.

Here, for what other modules did not cover against real processes:

1. registration: the secret (401), JSON only (415), a live worker's address cannot be re-bound
   to other models, `worker_name` a bare http(s)://host:port (also finding 7);
2. a request's pictures over HTTP: pixel limits checked on headers before any decoding;
3. an API client (not streaming) that hangs up stops its worker's generation;
4. a burst beyond --limit-model-concurrency + --max-queue-length: 429 / 42903 with Retry-After
   at once, nothing hangs, the next request is served;
5. the API tries once more on the worker the controller names when its worker is dead;
6. bounded bodies (413, declared or chunked), nesting 10^5 deep (400 JSON), refusals before the
   first token (prompt longer than the context, truncated picture) as a 4xx with one frame,
   kept as such by the controller's relay; the API's 400 for deep nesting;
8. with --api-keys, /metrics and what the chat page calls need a key; --public-metrics opens
   /metrics, --no-web-chat turns the page off.

Elsewhere: 1 test_worker_registration (a worker without the secret is never listed); 2
test_image_limits (the runtime: bombs refused before decoding, one picture decoded at a time);
3 test_worker_e2e (streaming and non-streaming clients of the worker that hang up); 4
test_worker_e2e (overload refused at once); 5 test_worker_drain (SIGTERM); 6 test_api_e2e (the
API's 413), test_worker_e2e (bad input refused, worker keeps serving); 7 test_api_e2e (remote
images: opt-in, allow-list, public addresses only, time and size limits).

Each test starts and stops its own servers.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from servers import (
    FakeControllerApp,
    Registered,
    ServerThread,
    free_port,
    metric,
    registered_worker,
    serving_stack,
    start_api,
    start_controller,
    start_worker,
    wait_for,
)

from vilaserve.adapters.offline.checkpoints.tiny_vila import make_png, make_png_b64

JSON = {"content-type": "application/json"}
NESTED = b"[" * 100_000 + b"]" * 100_000  # 10^5 levels deep, 200 kB
LONG = {"max_new_tokens": 300, "temperature": 0.9, "stop_token_ids": [-1]}
MIB = 1024 * 1024


def one_frame(response: httpx.Response) -> dict[str, Any]:
    """The single `\\0`-terminated frame of a refused generation request."""
    raw = response.content
    assert raw.endswith(b"\0") and raw.count(b"\0") == 1, raw[:300]
    frame: dict[str, Any] = json.loads(raw[:-1])
    return frame


def frames(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(part) for part in response.content.split(b"\0") if part]


def models(controller_url: str) -> list[str]:
    listed: list[str] = httpx.post(controller_url + "/list_models").json()["models"]
    return listed


# --- 1. registration ----------------------------------------------------------------------


def test_registration_needs_the_secret_json_and_a_bare_name_and_cannot_rebind_a_worker(
    tiny_vila_siglip: Path,
) -> None:
    secret = {"registration_secret": "s3cret"}
    with registered_worker(tiny_vila_siglip, secret, secret) as registered:
        check_registration(registered)


def check_registration(registered: Registered) -> None:
    url, address, model = registered.controller_url, registered.worker_url, registered.model
    claims = {
        "worker_name": address,
        "worker_status": {"model_names": ["evil"], "speed": 100, "queue_length": 0},
    }
    no_key = httpx.post(url + "/register_worker", json=claims)
    assert no_key.status_code == 401 and no_key.json()["error_code"] == 40101
    wrong = httpx.post(
        url + "/register_worker", json=claims, headers={"authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401 and wrong.json()["error_code"] == 40102
    leave = {"worker_name": address, "queue_length": 0, "leaving": True}
    assert httpx.post(url + "/receive_heart_beat", json=leave).status_code == 401
    auth = {"authorization": "Bearer s3cret"}
    # A web page can only post text/plain or forms without asking: refused before the body.
    as_text = httpx.post(
        url + "/register_worker",
        content=json.dumps(claims),
        headers={**auth, "content-type": "text/plain"},
    )
    assert as_text.status_code == 415 and as_text.json()["error_code"] == 40001
    # Even with the secret, a live worker's address keeps what the worker itself reports.
    assert httpx.post(url + "/register_worker", json=claims, headers=auth).status_code == 200
    assert models(url) == [model]
    assert httpx.post(url + "/get_worker_address", json={"model": "evil"}).json() == {"address": ""}
    for name in (address + "/steal", "http://user@127.0.0.1:1", "ftp://127.0.0.1:1", "x"):
        bad = httpx.post(
            url + "/register_worker", json={**claims, "worker_name": name}, headers=auth
        )
        assert bad.status_code == 400, name
        assert bad.json()["error_code"] == 40001 and "bare" in bad.json()["text"], bad.text
    assert models(url) == [model]
    # The real worker still registers and is served through the controller.
    body = {"model": model, "prompt": "USER: hi ASSISTANT:", "max_new_tokens": 3}
    relayed = httpx.post(url + "/worker_generate_stream", json=body, timeout=60)
    assert relayed.status_code == 200 and frames(relayed)[-1]["error_code"] == 0


# --- 2. pictures ------------------------------------------------------------------------------


def test_sixteen_huge_pictures_are_refused_over_http_before_any_is_decoded(
    tiny_vila_siglip: Path,
) -> None:
    out = io.BytesIO()
    Image.new("1", (8000, 8000), 1).save(out, format="PNG")  # 64 M pixels in 23 kB
    bomb = base64.b64encode(out.getvalue()).decode()
    body = {"prompt": "USER: " + "<image>\n" * 16 + "hi ASSISTANT:", "images": [bomb] * 16}
    with start_worker(tiny_vila_siglip) as worker:
        started = time.perf_counter()
        refused = httpx.post(worker.url + "/worker_generate_stream", json=body, timeout=60)
        took = time.perf_counter() - started
        assert refused.status_code == 400
        frame = one_frame(refused)
        assert frame["error_code"] == 40001 and "pixels in all" in frame["text"], frame
        assert took < 3.0  # headers only: nothing was decoded
        out = io.BytesIO()
        Image.new("1", (8001, 8000), 1).save(out, format="PNG")  # one over --max-image-pixels
        one = {
            "prompt": "USER: <image>\nhi ASSISTANT:",
            "images": [base64.b64encode(out.getvalue()).decode()],
        }
        alone = httpx.post(worker.url + "/worker_generate", json=one, timeout=60)
        assert alone.status_code == 400 and "pixels" in alone.json()["text"], alone.text


# --- 3. an API client that hangs up -----------------------------------------------------------


def test_an_api_client_that_hangs_up_before_its_answer_stops_the_generation(
    tiny_vila_siglip: Path,
) -> None:
    with serving_stack(tiny_vila_siglip) as stack:
        body = {
            "model": stack.model,
            "messages": [{"role": "user", "content": "A long tale."}],
            "max_tokens": 400,
            "temperature": 0.9,
            "stop_token_ids": [-1],
            "seed": 3,
        }
        url = stack.api_url + "/v1/chat/completions"
        started = time.perf_counter()
        whole = httpx.post(url, json=body, timeout=120).json()["usage"]["completion_tokens"]
        seconds_whole = time.perf_counter() - started
        assert whole > 300
        before = metric(stack.worker_url, "vllm:generation_tokens_total")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=body, timeout=seconds_whole / 5)
        deadline = time.monotonic() + 10
        while metric(stack.worker_url, "vllm:num_requests_running"):
            assert time.monotonic() < deadline, "the generation ran on for nobody"
            time.sleep(0.02)
        generated = metric(stack.worker_url, "vllm:generation_tokens_total") - before
        assert generated < whole * 0.75, (generated, whole)
        served = httpx.post(url, json={**body, "max_tokens": 3}, timeout=60)
        assert served.status_code == 200


# --- 4. overload --------------------------------------------------------------------------------


@dataclass
class Answer:
    path: str
    status: int
    last: dict[str, Any]
    frames: int
    retry_after: str | None
    seconds: float


def test_a_burst_beyond_concurrency_and_queue_is_refused_at_once_and_nothing_hangs(
    tiny_vila_siglip: Path,
) -> None:
    burst = 32
    with start_worker(tiny_vila_siglip, limit_model_concurrency=2, max_queue_length=2) as worker:

        async def one(client: httpx.AsyncClient, i: int) -> Answer:
            path = "/worker_generate_stream" if i % 2 == 0 else "/worker_generate"
            body = {"prompt": f"USER: hi {i} ASSISTANT:", **LONG}
            started = time.perf_counter()
            async with client.stream("POST", worker.url + path, json=body) as response:
                raw = await response.aread()
            seconds = time.perf_counter() - started
            parts = [p for p in raw.split(b"\0") if p] if path.endswith("stream") else [raw]
            return Answer(
                path,
                response.status_code,
                json.loads(parts[-1]),
                len(parts),
                response.headers.get("retry-after"),
                seconds,
            )

        async def all_at_once() -> list[Answer]:
            limits = httpx.Limits(max_connections=burst, max_keepalive_connections=burst)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                work = asyncio.gather(*(one(client, i) for i in range(burst)))
                return await asyncio.wait_for(work, timeout=120)  # nothing hangs

        answers = asyncio.run(all_at_once())
        served = [a for a in answers if a.status == 200]
        refused = [a for a in answers if a.status == 429]
        assert len(served) + len(refused) == burst, [(a.status, a.last) for a in answers]
        assert all(a.last["error_code"] == 0 for a in served)
        assert len(served) >= 4  # two running and two queued are all served
        assert refused
        for a in refused:
            assert a.last["error_code"] == 42903 and "busy" in a.last["text"], a
            assert a.retry_after == "1" and a.frames == 1, a
        assert max(a.seconds for a in refused) < min(a.seconds for a in served)  # at once
        assert max(a.seconds for a in refused) < 5.0
        # After the burst: nothing left queued, and the next request is served.
        assert httpx.post(worker.url + "/worker_get_status").json()["queue_length"] == 0
        after = httpx.post(
            worker.url + "/worker_generate", json={"prompt": "q", "max_new_tokens": 3}
        )
        assert after.status_code == 200 and after.json()["error_code"] == 0


# --- 5. failover ------------------------------------------------------------------------------


def test_the_api_tries_once_more_on_the_worker_the_controller_names_when_its_worker_is_dead(
    tiny_vila_siglip: Path,
) -> None:
    with start_controller() as control:

        def worker_at(port: int) -> ServerThread:
            return start_worker(
                tiny_vila_siglip,
                register_with_controller=True,
                controller_address=control.url,
                worker_address=f"http://127.0.0.1:{port}",
                port=port,
            )

        first_port, second_port = free_port(), free_port()
        # The API keeps the worker's address: it will not ask the controller again by itself.
        with start_api(control.url, worker_address_ttl_s=600, model_info_ttl_s=600) as api:
            body = {
                "model": tiny_vila_siglip.name,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3,
            }
            url = api.url + "/v1/chat/completions"
            with worker_at(first_port):
                wait_for(lambda: models(control.url) == [tiny_vila_siglip.name])
                assert httpx.post(url, json=body, timeout=60).status_code == 200
            # The first worker is gone without a word; the controller still lists it.
            with worker_at(second_port):
                status = control.url + "/worker_get_status"
                wait_for(lambda: httpx.post(status).json()["speed"] == 2)
                reply = httpx.post(url, json=body, timeout=60)
                assert reply.status_code == 200, reply.text
                assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
                # The API told the controller, which dropped the dead worker.
                assert httpx.post(status).json()["speed"] == 1
                address = httpx.post(
                    control.url + "/get_worker_address", json={"model": tiny_vila_siglip.name}
                ).json()["address"]
                assert address == f"http://127.0.0.1:{second_port}"


# --- 6. bounded bodies, refusals before the first token -------------------------------------


def chunked(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """An upload without Content-Length (chunked): the limit must hold as it arrives."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def truncated_png_b64() -> str:
    whole = make_png(48, 32, "blue")
    return base64.b64encode(whole[: len(whole) // 2]).decode()


def test_the_worker_bounds_bodies_and_refuses_before_the_first_token_with_a_4xx(
    tiny_vila_siglip: Path,
) -> None:
    big = json.dumps({"prompt": "x" * (2 * MIB)}).encode()
    with start_worker(tiny_vila_siglip, max_request_bytes=MIB) as worker:
        url = worker.url
        declared = httpx.post(url + "/worker_generate_stream", content=big, headers=JSON)
        assert declared.status_code == 413
        frame = one_frame(declared)
        assert frame["error_code"] == 40001 and str(MIB) in frame["text"], frame
        streamed = httpx.post(url + "/worker_generate", content=chunked(big), headers=JSON)
        assert streamed.status_code == 413 and streamed.json()["error_code"] == 40001
        counted = httpx.post(url + "/count_token", content=big, headers=JSON)
        assert counted.status_code == 413 and counted.json()["error_code"] == 40001

        deep_stream = httpx.post(url + "/worker_generate_stream", content=NESTED, headers=JSON)
        assert deep_stream.status_code == 400
        assert "nested too deeply" in one_frame(deep_stream)["text"]
        deep = httpx.post(url + "/worker_generate", content=NESTED, headers=JSON)
        assert deep.status_code == 400 and deep.json()["error_code"] == 40001
        assert "nested too deeply" in deep.json()["text"]

        too_long = {"prompt": "the cat " * 400, "max_new_tokens": 4}  # context: 512
        refused = httpx.post(url + "/worker_generate_stream", json=too_long)
        assert refused.status_code == 400
        frame = one_frame(refused)
        assert frame["error_code"] == 40303 and "context" in frame["text"], frame
        refused = httpx.post(url + "/worker_generate", json=too_long)
        assert refused.status_code == 400 and refused.json()["error_code"] == 40303

        broken = {"prompt": "USER: <image>\nhi ASSISTANT:", "images": [truncated_png_b64()]}
        refused = httpx.post(url + "/worker_generate_stream", json=broken, timeout=30)
        assert refused.status_code == 400
        frame = one_frame(refused)
        assert frame["error_code"] == 40001 and "image" in frame["text"], frame

        ok = httpx.post(url + "/worker_generate_stream", json={"prompt": "q", "max_new_tokens": 3})
        assert ok.status_code == 200 and frames(ok)[-1]["error_code"] == 0


def test_the_controller_bounds_bodies_and_relays_a_workers_refusal_with_its_status(
    tiny_vila_siglip: Path,
) -> None:
    with registered_worker(tiny_vila_siglip, {"max_request_bytes": MIB}) as registered:
        check_controller_bounds(registered)


def check_controller_bounds(registered: Registered) -> None:
    url, model = registered.controller_url, registered.model
    big = json.dumps({"model": model, "prompt": "x" * (2 * MIB)}).encode()
    relay = url + "/worker_generate_stream"
    declared = httpx.post(relay, content=big, headers=JSON)
    assert declared.status_code == 413 and one_frame(declared)["error_code"] == 40001
    streamed = httpx.post(url + "/register_worker", content=chunked(big), headers=JSON)
    assert streamed.status_code == 413 and streamed.json()["error_code"] == 40001

    deep = httpx.post(relay, content=NESTED, headers=JSON)
    assert deep.status_code == 400 and "nested too deeply" in one_frame(deep)["text"]
    deep = httpx.post(url + "/get_worker_address", content=NESTED, headers=JSON)
    assert deep.status_code == 400 and deep.json()["error_code"] == 40001

    # The worker's 400s (before its first token) stay 400s, in one frame.
    too_long = {"model": model, "prompt": "the cat " * 400, "max_new_tokens": 4}
    refused = httpx.post(relay, json=too_long, timeout=60)
    assert refused.status_code == 400 and one_frame(refused)["error_code"] == 40303
    broken = {
        "model": model,
        "prompt": "USER: <image>\nhi ASSISTANT:",
        "images": [truncated_png_b64()],
    }
    refused = httpx.post(relay, json=broken, timeout=60)
    assert refused.status_code == 400 and one_frame(refused)["error_code"] == 40001
    out_of_range = httpx.post(relay, json={"model": model, "prompt": "q", "top_p": 0}, timeout=60)
    assert out_of_range.status_code == 400 and one_frame(out_of_range)["error_code"] == 40302

    picture = {
        "model": model,
        "prompt": "USER: <image>\nhi ASSISTANT:",
        "images": [make_png_b64(40, 30, "red")],
        "max_new_tokens": 3,
    }
    ok = httpx.post(relay, json=picture, timeout=60)
    assert ok.status_code == 200 and frames(ok)[-1]["error_code"] == 0


def test_the_api_answers_deep_nesting_with_a_json_400() -> None:
    with ServerThread(FakeControllerApp().app) as control, start_api(control.url) as api:
        deep = httpx.post(api.url + "/v1/chat/completions", content=NESTED, headers=JSON)
        assert deep.status_code == 400
        error = deep.json()["error"]
        assert error["type"] == "invalid_request_error" and "nested too deeply" in error["message"]


# --- 8. keys --------------------------------------------------------------------------------


def test_with_api_keys_metrics_and_the_chat_pages_api_need_a_key_unless_flagged_otherwise() -> None:
    key = {"authorization": "Bearer k-1"}
    with ServerThread(FakeControllerApp().app) as control:
        with start_api(control.url, api_keys="k-1,k-2") as api:
            closed = httpx.get(api.url + "/metrics")
            assert closed.status_code == 401
            assert closed.json()["error"]["type"] == "authentication_error"
            assert closed.headers["www-authenticate"] == "Bearer"
            wrong = httpx.get(api.url + "/metrics", headers={"authorization": "Bearer k-3"})
            assert wrong.status_code == 401
            opened = httpx.get(api.url + "/metrics", headers=key)
            assert opened.status_code == 200 and opened.headers["content-type"].startswith(
                "text/plain"
            )
            # The chat page is a static page that asks for the key; what it calls needs one.
            page = httpx.get(api.url + "/")
            assert page.status_code == 200 and 'id="api-key"' in page.text
            assert httpx.get(api.url + "/v1/models").status_code == 401
            chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            assert httpx.post(api.url + "/v1/chat/completions", json=chat).status_code == 401
            assert httpx.get(api.url + "/v1/models", headers=key).status_code == 200
        with start_api(control.url, api_keys="k-1", public_metrics=True, web_chat=False) as api:
            assert httpx.get(api.url + "/metrics").status_code == 200  # a scraper without a key
            assert httpx.get(api.url + "/v1/models").status_code == 401
            off = httpx.get(api.url + "/")
            assert off.status_code == 404 and "--no-web-chat" in off.json()["error"]["message"]
