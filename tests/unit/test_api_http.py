"""The API server over HTTP with fake controller and workers behind its container."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import threading
import time

import pytest
from api_fakes import (
    ADDRESS,
    MODEL,
    PNG_DATA_URL,
    FakeDirectory,
    FakeImageFetcher,
    FakeWorkerGateway,
    chat_body,
    fake_api,
    sse_events,
)

from vilaserve.domain.shared.conversation import LlmShape, choose_template


def image_body(url: str = PNG_DATA_URL, **extra: object) -> dict:
    content = [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def test_chat_completion_body_and_what_the_worker_is_sent() -> None:
    with fake_api() as api:
        response = api.client.post("/v1/chat/completions", json=image_body(max_tokens=3))
        assert response.status_code == 200
        body = response.json()
        assert body["object"] == "chat.completion" and body["model"] == MODEL
        assert body["choices"] == [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello, world"},
                "logprobs": None,
                "finish_reason": "length",
            }
        ]
        sent = api.workers.payloads[0]
        assert sent["prompt"].endswith("USER: <image>\nWhat? ASSISTANT:")
        assert sent["images"] == [PNG_DATA_URL] and sent["echo"] is False
        prompt_tokens = len(sent["prompt"].split()) + 4
        assert body["usage"] == {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 3,
            "total_tokens": prompt_tokens + 3,
        }


def test_a_workers_jinja_template_is_rendered_by_the_containers_renderer() -> None:
    jinja = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    template = choose_template(LlmShape(49152, 30, 9), jinja)
    with fake_api(workers=FakeWorkerGateway(template=template)) as api:
        response = api.client.post("/v1/chat/completions", json=image_body())
        assert response.status_code == 200, response.text
        assert api.workers.payloads[0]["prompt"] == (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\n"
        )


def test_stream_is_sse_with_role_deltas_finish_usage_and_done() -> None:
    with fake_api() as api:
        body = chat_body(stream=True, stream_options={"include_usage": True})
        response = api.client.post("/v1/chat/completions", json=body)
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
    assert deltas == ["Hello", ",", " world", "!"]
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(c["usage"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1


def test_stream_without_usage_option_has_no_usage_field() -> None:
    with fake_api() as api:
        events = sse_events(
            api.client.post("/v1/chat/completions", json=chat_body(stream=True)).text
        )
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_n_choices_are_sent_concurrently_with_consecutive_seeds() -> None:
    with fake_api(workers=FakeWorkerGateway(delay_s=0.02)) as api:
        body = api.client.post("/v1/chat/completions", json=chat_body(n=3, seed=5)).json()
        assert [p["seed"] for p in api.workers.payloads] == [5, 6, 7]
        assert api.workers.most_at_once == 3  # side by side, not one after the other
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 12


def test_stop_strings_reach_the_worker_and_cut_the_answer() -> None:
    with fake_api() as api:
        body = api.client.post("/v1/chat/completions", json=chat_body(stop=" wor")).json()
        assert api.workers.payloads[0]["stop"] == [" wor", "</s>"]
    assert body["choices"][0]["message"]["content"] == "Hello,"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_completions_with_echo_and_several_prompts() -> None:
    with fake_api() as api:
        body = api.client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": ["one", "two"], "echo": True, "max_tokens": 2},
        ).json()
        assert [p["prompt"] for p in api.workers.payloads] == ["one", "two"]
    assert body["object"] == "text_completion"
    assert [c["text"] for c in body["choices"]] == ["oneHello,", "twoHello,"]
    assert body["usage"]["prompt_tokens"] == 2 and body["usage"]["completion_tokens"] == 4


def test_streamed_completion() -> None:
    with fake_api() as api:
        raw = api.client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "q", "stream": True}
        ).text
    chunks = sse_events(raw)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello, world!"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (chat_body(model="other"), 404, "does not exist; available: VILA1.5-3b"),
        (chat_body(temperature=9), 400, "temperature"),
        (image_body("https://example.com/x.png"), 400, "--allow-remote-images"),
        (image_body("file:///etc/passwd"), 400, "data URL"),
        (image_body("data:image/png,notbase64"), 400, "base64"),
        (image_body("data:text/plain;base64,AAAA"), 400, "not an image"),
    ],
)
def test_refusals_before_any_generation(body: dict, status: int, says: str) -> None:
    with fake_api() as api:
        response = api.client.post("/v1/chat/completions", json=body)
        assert not api.workers.payloads
    assert response.status_code == status
    error = response.json()["error"]
    assert says in error["message"] and error["type"] and isinstance(error["code"], int)


def test_malformed_json_and_unknown_paths() -> None:
    with fake_api() as api:
        bad = api.client.post("/v1/chat/completions", content=b"{nope")
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
        missing = api.client.get("/v1/nothing")
        assert missing.status_code == 404 and "no such endpoint" in missing.text


@pytest.mark.parametrize(
    ("refusal", "status"),
    [
        ((40001, "image 1 could not be decoded as an image"), 400),
        ((40303, "the prompt takes 900 tokens; the context holds 512"), 400),
        ((42903, "the worker is busy"), 429),
        ((50002, "CUDA out of memory"), 500),
    ],
)
def test_worker_refusals_become_http_statuses_streaming_or_not(
    refusal: tuple[int, str], status: int
) -> None:
    with fake_api(workers=FakeWorkerGateway(refuse=refusal)) as api:
        for stream in (False, True):
            response = api.client.post("/v1/chat/completions", json=chat_body(stream=stream))
            assert response.status_code == status
            assert response.json()["error"] == {
                "message": refusal[1],
                "type": response.json()["error"]["type"],
                "param": None,
                "code": refusal[0],
            }


def test_error_mid_stream_is_an_openai_error_event() -> None:
    with fake_api(workers=FakeWorkerGateway(fail_after=2)) as api:
        events = sse_events(
            api.client.post("/v1/chat/completions", json=chat_body(stream=True)).text
        )
        assert api.client.get("/health").status_code == 200
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["message"] == "simulated kernel failure"
    assert events[-2]["error"]["code"] == 50001
    assert [e["choices"][0]["delta"].get("content") for e in events[1:3]] == ["Hello", ","]


def test_worker_failure_mid_request_without_stream_is_a_500() -> None:
    with fake_api(workers=FakeWorkerGateway(fail_after=1)) as api:
        response = api.client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"


def test_no_worker_and_controller_down_are_503() -> None:
    with fake_api(directory=FakeDirectory(models={})) as api:
        response = api.client.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "no model worker is registered" in response.json()["error"]["message"]
    with fake_api(directory=FakeDirectory(down=True)) as api:
        response = api.client.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 503
        assert "controller" in response.json()["error"]["message"]
    with fake_api(workers=FakeWorkerGateway(down={ADDRESS})) as api:
        response = api.client.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 503 and ADDRESS in response.json()["error"]["message"]


def test_an_unreachable_worker_is_reported_and_the_request_goes_to_another() -> None:
    directory = FakeDirectory(models={MODEL: "http://dead:1"}, after_refresh={MODEL: ADDRESS})
    workers = FakeWorkerGateway(down={"http://dead:1"})
    with fake_api(directory=directory, workers=workers) as api:
        response = api.client.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 200, response.text
        assert directory.refreshes == 1  # the controller was told to check its workers


def test_api_keys() -> None:
    with fake_api(api_keys="alpha, beta") as api:
        none = api.client.post("/v1/chat/completions", json=chat_body())
        assert none.status_code == 401 and none.headers["www-authenticate"] == "Bearer"
        assert none.json()["error"]["code"] == 40101
        wrong = api.client.get("/v1/models", headers={"Authorization": "Bearer gamma"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == 40102
        ok = api.client.get("/v1/models", headers={"Authorization": "Bearer beta"})
        assert ok.status_code == 200
        for open_path in ("/health", "/"):
            assert api.client.get(open_path).status_code == 200
        # With keys, the metrics need one too, unless the operator opens them on purpose.
        assert api.client.get("/metrics").status_code == 401
        keyed = api.client.get("/metrics", headers={"Authorization": "Bearer alpha"})
        assert keyed.status_code == 200
    with fake_api(api_keys="alpha", public_metrics=True) as api:
        assert api.client.get("/metrics").status_code == 200
    with fake_api(web_chat=False) as api:
        page = api.client.get("/")
        assert page.status_code == 404 and "--no-web-chat" in page.json()["error"]["message"]


def test_oversized_bodies_get_413_declared_or_not() -> None:
    with fake_api(max_request_bytes=4096) as api:
        big = image_body("data:image/png;base64," + "A" * 8000)
        response = api.client.post("/v1/chat/completions", json=big)
        assert response.status_code == 413 and "limit" in response.json()["error"]["message"]

        def chunked() -> object:
            yield json.dumps(big).encode()

        response = api.client.post("/v1/chat/completions", content=chunked())
        assert response.status_code == 413


def test_too_many_requests_in_flight_get_429() -> None:
    with fake_api(workers=FakeWorkerGateway(delay_s=0.2), max_concurrent_requests=1) as api:
        results: list[int] = []
        slow = threading.Thread(
            target=lambda: results.append(
                api.client.post("/v1/chat/completions", json=chat_body()).status_code
            )
        )
        slow.start()
        deadline = time.monotonic() + 5
        while api.container.admission().active == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = api.client.post("/v1/chat/completions", json=chat_body())
        slow.join()
        assert second.status_code == 429 and "retry later" in second.json()["error"]["message"]
        assert results == [200]
        assert api.client.post("/v1/chat/completions", json=chat_body()).status_code == 200


def test_remote_images_are_fetched_and_sent_as_data_urls() -> None:
    fetcher = FakeImageFetcher({"https://img.example.com/cat.png": b"\x89PNG..."})
    with fake_api(fetcher=fetcher) as api:
        response = api.client.post(
            "/v1/chat/completions", json=image_body("https://img.example.com/cat.png")
        )
        assert response.status_code == 200
        assert api.workers.payloads[0]["images"] == ["data:image/png;base64,iVBORy4uLg=="]
        missing = api.client.post(
            "/v1/chat/completions", json=image_body("https://img.example.com/dog.png")
        )
        assert missing.status_code == 400 and "HTTP 404" in missing.text


def test_models_list_and_retrieve() -> None:
    with fake_api() as api:
        listing = api.client.get("/v1/models").json()
        assert listing["object"] == "list"
        assert [(m["id"], m["max_model_len"], m["multimodal"]) for m in listing["data"]] == [
            (MODEL, 64, True)
        ]
        assert api.client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
        assert api.client.get("/v1/models/else").status_code == 404


def test_health_chat_page_and_static_files() -> None:
    with fake_api() as api:
        assert api.client.get("/health").json() == {"status": "ok"}
        page = api.client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="chat-form"' in page.text
        assert "http://" not in page.text.replace("http://www.w3.org", "")  # no CDN
        assert api.client.get("/static/chat.js").status_code == 200
        assert api.client.get("/static/chat.css").status_code == 200


def test_metrics_after_requests() -> None:
    with fake_api() as api:
        api.client.post("/v1/chat/completions", json=chat_body(n=2))
        api.client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
        text = api.client.get("/metrics").text
    label = f'model_name="{MODEL}"'
    assert f'vilaserve:request_success_total{{finished_reason="stop",{label}}} 2' in text
    assert f'vilaserve:request_success_total{{finished_reason="length",{label}}} 1' in text
    assert f"vilaserve:generation_tokens_total{{{label}}} 10" in text
    assert f"vilaserve:time_to_first_token_seconds_count{{{label}}} 2" in text
    assert f"vilaserve:time_per_output_token_seconds_count{{{label}}} 3" in text
    assert f"vilaserve:num_requests_running{{{label}}} 0" in text
    assert f"vilaserve:num_requests_waiting{{{label}}} 0" in text


def test_logs_never_carry_image_payloads(caplog: pytest.LogCaptureFixture) -> None:
    secret = "data:image/png;base64,U0VDUkVUSU1BR0VCWVRFUw=="
    with caplog.at_level(logging.DEBUG), fake_api() as api:
        api.client.post("/v1/chat/completions", json=image_body(secret))
        api.client.post("/v1/chat/completions", json=image_body(secret, temperature=7))
    assert caplog.records
    for record in caplog.records:
        assert "U0VDUkVU" not in record.getMessage() and "U0VDUkVU" not in str(vars(record))


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_client_that_goes_away_stops_the_generation(spec_version: str) -> None:
    """ASGI 2.3 servers announce the disconnect; under 2.4 the next send fails instead."""
    workers = FakeWorkerGateway(reply=tuple(f" w{i}" for i in range(200)), delay_s=0.02)
    with fake_api(workers=workers) as api:
        app = api.client.app
        body = json.dumps(chat_body(stream=True)).encode()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": spec_version},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
        }

        async def one_request() -> list[bytes]:
            chunks: list[bytes] = []
            gone = asyncio.Event()
            pending = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict:
                if pending:
                    return pending.pop()
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict) -> None:
                if gone.is_set() and spec_version == "2.4":
                    raise OSError("client went away")
                if message["type"] == "http.response.body" and message.get("body"):
                    chunks.append(message["body"])
                    if len(chunks) == 3:
                        gone.set()

            await asyncio.wait_for(app(scope, receive, send), timeout=60)
            return chunks

        with contextlib.suppress(Exception):  # under 2.4 the app reports the disconnect
            asyncio.run(one_request())
        assert workers.closed == 1
        assert workers.yielded < 100  # of the 200 pieces the reply would have had
        assert api.container.admission().active == 0
        metrics = api.client.get("/metrics").text
        assert (
            f'vilaserve:request_failure_total{{error_type="cancelled",model_name="{MODEL}"}} 1'
            in metrics
        )
        assert f'vilaserve:num_requests_running{{model_name="{MODEL}"}} 0' in metrics


def test_the_api_server_imports_neither_torch_nor_pil() -> None:
    code = (
        "import sys\n"
        "import vilaserve.entrypoints.api.main\n"
        "from vilaserve.entrypoints.api.app import create_api_app\n"
        "assert not {'torch', 'PIL'} & set(sys.modules), 'a model library was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
