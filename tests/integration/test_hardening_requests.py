"""Issue 23's findings 1, 2, 3 and 5 ("Hardening, round two") against real services on loopback.

1. an empty prompt is refused with a 400 once, and the engine goes on serving the others;
2. text that is not valid Unicode (a lone surrogate) and JSON's non-standard NaN are a 400 on
   every service, and the controller never takes them for a worker's failure;
3. a 20 MB prompt is refused by its length before any tokenizing, nobody else waits for it, and
   the worker's memory stays bounded;
5. a JSON body of many tiny values (which would expand ~25x in memory) is refused before it is
   materialised, by the worker and by the controller.

Findings 3 and 5 measure memory, so their services run as child processes of their own.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import ApiStack, ChildServer, free_port, serving_stack, wait_for, worker_process

JSON = {"content-type": "application/json"}
MB = 1024 * 1024


@pytest.fixture(scope="module")
def tiny_vila_no_bos(tiny_vila_siglip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with a tokenizer that adds no BOS (as Qwen2's and SmolLM2's): an
    empty prompt then tokenizes to no id at all."""
    root = tmp_path_factory.mktemp("ckpt") / "VILA1.5-tiny-no-bos"
    shutil.copytree(tiny_vila_siglip, root)
    tokenizer = root / "llm" / "tokenizer.json"
    spec = json.loads(tokenizer.read_text())
    spec["post_processor"] = None
    tokenizer.write_text(json.dumps(spec))
    config = root / "llm" / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings["add_bos_token"] = False
    config.write_text(json.dumps(settings))
    return root


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def peak_mb(server: ChildServer) -> float:
    assert server.process is not None
    return status_kb(server.process.pid, "VmHWM") / 1024


def rss_mb(server: ChildServer) -> float:
    assert server.process is not None
    return status_kb(server.process.pid, "VmRSS") / 1024


def timed_post(url: str, **kwargs: Any) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    reply = httpx.post(url, **kwargs)
    return reply, time.perf_counter() - started


# --- 1. an empty prompt -------------------------------------------------------------------


def test_an_empty_prompt_is_refused_once_and_the_engine_serves_the_others(
    tiny_vila_no_bos: Path,
) -> None:
    with serving_stack(tiny_vila_no_bos) as stack, ThreadPoolExecutor(4) as pool:
        worker, api = stack.worker_url, stack.api_url
        normal = {"prompt": "USER: hi ASSISTANT:", "max_new_tokens": 4, "temperature": 0}
        _, alone = timed_post(worker + "/worker_generate", json=normal, timeout=30)
        empty = pool.submit(
            httpx.post,
            worker + "/worker_generate",
            json={"prompt": "", "max_new_tokens": 2},
            timeout=15,
        )
        time.sleep(0.2)  # the empty prompt is in the engine first
        reply, took = timed_post(worker + "/worker_generate", json=normal, timeout=30)
        assert reply.status_code == 200 and reply.json()["error_code"] == 0, reply.text
        assert took < 2 * alone + 1.0, (took, alone)
        refused = empty.result()
        assert refused.status_code == 400, refused.text
        assert refused.json()["error_code"] == 40001 and "empty" in refused.json()["text"]
        streamed = httpx.post(worker + "/worker_generate_stream", json={"prompt": ""}, timeout=15)
        assert streamed.status_code == 400 and b"empty" in streamed.content
        for prompt in ("", ["ok", ""]):
            body = {"model": stack.model, "prompt": prompt, "max_tokens": 2}
            answer = httpx.post(api + "/v1/completions", json=body, timeout=15)
            assert answer.status_code == 400, answer.text
            assert "empty" in answer.json()["error"]["message"], answer.text
        reply = httpx.post(worker + "/worker_generate", json=normal, timeout=30)
        assert reply.status_code == 200 and reply.json()["error_code"] == 0, reply.text


# --- 2. text that is not Unicode, NaN -----------------------------------------------------


def test_invalid_unicode_and_nan_are_a_400_everywhere_and_the_controller_keeps_its_worker(
    tiny_vila_siglip: Path,
) -> None:
    with serving_stack(tiny_vila_siglip) as stack:
        model = stack.model
        # json.dumps writes a lone surrogate as its \\ud800 escape, and NaN as the bare word.
        lone = {"model": model, "prompt": "USER: x \ud800 ASSISTANT:", "max_new_tokens": 2}
        nan = {"model": model, "prompt": "USER: x ASSISTANT:", "temperature": float("nan")}
        poisons = [json.dumps(lone).encode(), json.dumps(nan).encode()]
        assert b"\\ud800" in poisons[0] and b"NaN" in poisons[1]
        for _ in range(5):  # FastChat's relay retried: once a second made 46 of 52 fail
            for raw in poisons:
                relayed = httpx.post(
                    stack.controller_url + "/worker_generate_stream",
                    content=raw,
                    headers=JSON,
                    timeout=15,
                )
                assert relayed.status_code == 400, relayed.content
                frame = json.loads(relayed.content.rstrip(b"\0"))
                assert frame["error_code"] == 40001, frame
                assert "Unicode" in frame["text"] or "NaN" in frame["text"], frame
        listed = httpx.post(stack.controller_url + "/list_models").json()["models"]
        assert listed == [model]
        for path in ("/count_token", "/worker_generate_stream", "/worker_generate"):
            direct = httpx.post(stack.worker_url + path, content=poisons[0], headers=JSON)
            assert direct.status_code == 400, (path, direct.content)
            assert b"Unicode" in direct.content, (path, direct.content)
        chats = [
            {"model": model, "messages": [{"role": "user", "content": "x \udfff"}]},
            {"model": model, "messages": [{"role": "user", "content": "x"}], "top_p": float("inf")},
        ]
        for chat in chats:
            answer = httpx.post(
                stack.api_url + "/v1/chat/completions",
                content=json.dumps(chat).encode(),
                headers=JSON,
                timeout=15,
            )
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["type"] == "invalid_request_error"
        fine = {"model": model, "prompt": "USER: hi ASSISTANT:", "max_new_tokens": 3}
        served = httpx.post(stack.controller_url + "/worker_generate_stream", json=fine)
        assert served.status_code == 200
        assert json.loads(served.content.split(b"\0")[-2])["error_code"] == 0


# --- 3. a 20 MB prompt --------------------------------------------------------------------


def test_a_huge_prompt_is_refused_before_tokenizing_and_nobody_waits_for_it(
    tiny_vila_siglip: Path,
) -> None:
    port = free_port()
    with worker_process(tiny_vila_siglip, port) as worker, ThreadPoolExecutor(4) as pool:
        small = {"prompt": "USER: hi ASSISTANT:", "max_new_tokens": 4, "temperature": 0}
        httpx.post(worker.url + "/worker_generate", json=small, timeout=30)  # warm
        _, normal = timed_post(worker.url + "/worker_generate", json=small, timeout=30)
        before = rss_mb(worker)
        huge = "USER: " + "hello there " * 1_750_000 + "ASSISTANT:"  # 21 MB
        long = "USER: " + "hello there " * 100_000 + "ASSISTANT:"  # 1.2 MB: within the body
        requests = [
            ("/worker_generate", {"prompt": huge, "max_new_tokens": 2}, "without any picture"),
            ("/count_token", {"prompt": huge}, "without any picture"),
            ("/worker_generate", {"prompt": long, "max_new_tokens": 2}, "characters"),
            ("/count_token", {"prompt": long}, "characters"),
        ]
        pending = [
            pool.submit(timed_post, worker.url + path, json=body, timeout=120)
            for path, body, _ in requests
        ]
        time.sleep(0.3)
        reply, took = timed_post(worker.url + "/worker_generate", json=small, timeout=120)
        assert reply.status_code == 200, reply.text
        assert took < 2 * normal + 1.0, (took, normal)
        for (path, _, reason), future in zip(requests, pending, strict=True):
            refused, seconds = future.result()
            assert refused.status_code in (400, 413), (path, refused.text[:300])
            assert reason in refused.json()["text"], (path, refused.text[:300])
            assert seconds < 5, (path, seconds)
        assert peak_mb(worker) - before < 400, (peak_mb(worker), before)
        # What a spike took is given back to the system.
        wait_for(lambda: rss_mb(worker) - before < 150, timeout=10)


def test_a_huge_prompt_through_the_api_is_refused_before_it_is_parsed(api_stack: ApiStack) -> None:
    huge = "hello there " * 1_750_000  # 21 MB
    chat = {"model": api_stack.model, "messages": [{"role": "user", "content": huge}]}
    text = {"model": api_stack.model, "prompt": huge}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", text)):
        refused, seconds = timed_post(api_stack.api_url + path, json=body, timeout=60)
        assert refused.status_code == 413, refused.text[:300]
        assert "without any picture" in refused.json()["error"]["message"]
        assert seconds < 3, seconds  # read, never parsed nor rendered


# --- 5. JSON that expands in memory -------------------------------------------------------


def expanding_body(megabytes: int, images: str = "") -> bytes:
    """`{"prompt": "hi", "x": [{}, {}, ...]}`: 3 bytes per dict on the wire, ~25x in memory.
    `images` "first": it names an (empty) list of pictures before the values, so only the
    value bound stops it; "last": after them, beyond the first 4 MiB, where a request's
    pictures must be named."""
    count = megabytes * MB // 3
    first = b'"images": [], ' if images == "first" else b""
    last = b', "images": []' if images == "last" else b""
    values = b'"x": [' + b"{}," * count + b"{}]"
    return b'{"prompt": "USER: hi ASSISTANT:", ' + first + values + last + b"}"


@contextmanager
def controller_process() -> Iterator[ChildServer]:
    server = ChildServer(
        ["controller", "--log-format", "text"], free_port(), ready_path="/test_connection"
    )
    with server:
        yield server


def test_a_body_of_many_tiny_values_is_refused_before_it_is_materialised(
    tiny_vila_siglip: Path,
) -> None:
    bodies = [(expanding_body(32), 413, b"without any picture")]
    bodies.append((expanding_body(32, "last"), 413, b"without any picture"))
    bodies.append((expanding_body(32, "first"), 400, b"JSON commas and brackets"))
    with worker_process(tiny_vila_siglip, free_port()) as worker, controller_process() as control:
        for server, path in ((worker, "/worker_generate"), (control, "/worker_generate_stream")):
            before = rss_mb(server)
            for body, status, reason in bodies:
                refused = httpx.post(server.url + path, content=body, headers=JSON, timeout=120)
                assert refused.status_code == status, refused.content[:300]
                assert reason in refused.content, refused.content[:300]
            # The body itself (32 MB) is read; what it would have become (~800 MB) is not.
            grew = peak_mb(server) - before
            assert grew < 250, (path, grew)
        small = {"prompt": "USER: hi ASSISTANT:", "max_new_tokens": 2}
        served = httpx.post(worker.url + "/worker_generate", json=small, timeout=30)
        assert served.status_code == 200, served.text
