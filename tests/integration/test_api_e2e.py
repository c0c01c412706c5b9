"""The OpenAI-compatible API on loopback, driven by the official `openai` client:
client -> API -> controller -> a real worker on a tiny random VILA checkpoint."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from servers import ApiStack, FakeControllerApp, ServerThread, free_port, start_api

from vilaserve.adapters.offline.checkpoints.tiny_vila import make_png

VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
PNG = make_png(40, 30, "red")
PNG_B64 = base64.b64encode(PNG).decode()
DATA_URL = "data:image/png;base64," + PNG_B64
WORKER_CALLS = {"/register_worker", "/receive_heart_beat"}  # the worker's own, not the API's


def client_for(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture
def client(api_stack: ApiStack) -> openai.OpenAI:
    return client_for(api_stack.api_url)


def vicuna_prompt(question: str, images: int = 0) -> str:
    """The prompt a VILA vicuna_v1 model expects, written out by hand."""
    return f"{VICUNA} USER: " + "<image>\n" * images + f"{question} ASSISTANT:"


def worker_answer(stack: ApiStack, prompt: str, images: list[str], **params: Any) -> dict:
    """The worker's own answer for `prompt`, asked directly (no API in between)."""
    body = {"prompt": prompt, "images": images, "echo": False, "temperature": 0, **params}
    return httpx.post(stack.worker_url + "/worker_generate", json=body, timeout=60).json()


def image_message(text: str, url: str = DATA_URL) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


def test_chat_with_a_base64_image_equals_the_workers_greedy_answer(
    api_stack: ApiStack, client: openai.OpenAI
) -> None:
    reply = client.chat.completions.create(
        model=api_stack.model,
        messages=image_message("What is it?"),
        temperature=0,
        max_tokens=8,
    )
    direct = worker_answer(api_stack, vicuna_prompt("What is it?", 1), [PNG_B64], max_new_tokens=8)
    assert direct["error_code"] == 0
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == direct["text"]
    assert choice.finish_reason == direct["finish_reason"]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    assert reply.usage.completion_tokens == direct["usage"]["completion_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == api_stack.model and reply.id.startswith("chatcmpl-")


def test_streaming_chat_reports_usage_in_its_last_chunk(
    api_stack: ApiStack, client: openai.OpenAI
) -> None:
    stream = client.chat.completions.create(
        model=api_stack.model,
        messages=image_message("Describe the picture."),
        temperature=0,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    direct = worker_answer(
        api_stack, vicuna_prompt("Describe the picture.", 1), [PNG_B64], max_new_tokens=10
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == direct["text"]
    assert sum(1 for p in pieces if p) >= 2  # streamed token by token, not in one piece
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == direct["finish_reason"] and not any(finishes[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == direct["usage"]["completion_tokens"]
    assert last.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_run_with_consecutive_seeds_and_usage_adds_up(
    api_stack: ApiStack, client: openai.OpenAI
) -> None:
    common: dict[str, Any] = {
        "model": api_stack.model,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "temperature": 1.0,
        "max_tokens": 8,
    }
    both = client.chat.completions.create(n=2, seed=11, **common)
    first = client.chat.completions.create(seed=11, **common)
    second = client.chat.completions.create(seed=12, **common)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].message.content == first.choices[0].message.content
    assert both.choices[1].message.content == second.choices[0].message.content
    assert both.usage and first.usage and second.usage
    assert both.usage.prompt_tokens == first.usage.prompt_tokens  # one prompt, counted once
    assert both.usage.completion_tokens == (
        first.usage.completion_tokens + second.usage.completion_tokens
    )


def test_stop_string_cuts_the_answer(api_stack: ApiStack, client: openai.OpenAI) -> None:
    common: dict[str, Any] = {
        "model": api_stack.model,
        "messages": [{"role": "user", "content": "tell me about the cat"}],
        "temperature": 0,
        "max_tokens": 24,
    }
    full = client.chat.completions.create(**common).choices[0].message.content or ""
    assert len(full) > 4
    stop = full[2:4]
    cut = client.chat.completions.create(stop=[stop], **common).choices[0]
    assert cut.message.content == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_text_completions_streaming_and_not(api_stack: ApiStack, client: openai.OpenAI) -> None:
    prompt = "USER: hello there ASSISTANT:"
    direct = worker_answer(api_stack, prompt, [], max_new_tokens=6)
    whole = client.completions.create(
        model=api_stack.model, prompt=prompt, max_tokens=6, temperature=0
    )
    assert whole.object == "text_completion"
    assert whole.choices[0].text == direct["text"]
    assert whole.usage and whole.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    stream = client.completions.create(
        model=api_stack.model, prompt=prompt, max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == direct["text"]
    echoed = client.completions.create(
        model=api_stack.model, prompt=prompt, max_tokens=6, temperature=0, echo=True
    )
    assert echoed.choices[0].text == prompt + direct["text"]


def test_models_lists_the_workers_model_with_its_context(
    api_stack: ApiStack, client: openai.OpenAI
) -> None:
    models = {m.id: m for m in client.models.list()}
    assert api_stack.model in models
    card = models[api_stack.model].model_dump()
    assert card["max_model_len"] == 512 and card["multimodal"] is True
    assert client.models.retrieve(api_stack.model).id == api_stack.model


def test_a_request_costs_at_most_one_controller_lookup(api_stack: ApiStack) -> None:
    with start_api(api_stack.controller_url, worker_address_ttl_s=60) as api:
        client = client_for(api.url)
        before = api_stack.controller_calls.copy()
        for _ in range(3):
            client.chat.completions.create(
                model=api_stack.model,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
            )
        made = api_stack.controller_calls - before
        by_the_api = {p: n for p, n in made.items() if p not in WORKER_CALLS}
        assert by_the_api == {"/get_worker_address": 1}, made


def test_errors_have_openai_shape_and_the_right_status(
    api_stack: ApiStack, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert "no-such-model" in unknown.value.message and api_stack.model in unknown.value.message
    not_an_image = "data:image/png;base64," + base64.b64encode(b"GIF? no").decode()
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(
                model=api_stack.model,
                messages=image_message("What?", not_an_image),
                stream=stream,
            )
        assert "image" in bad.value.message
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(
            model=api_stack.model, messages=[{"role": "user", "content": "hi"}], top_p=3
        )
    # The server keeps serving after all of these.
    ok = client.chat.completions.create(
        model=api_stack.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_api_keys_are_enforced_when_configured(api_stack: ApiStack) -> None:
    with start_api(api_stack.controller_url, api_keys="k-one,k-two") as api:
        message = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.AuthenticationError):
            client_for(api.url, "wrong").chat.completions.create(
                model=api_stack.model, messages=message
            )
        missing = httpx.post(api.url + "/v1/chat/completions", json={"model": "m"})
        assert missing.status_code == 401 and missing.json()["error"]["type"] == (
            "authentication_error"
        )
        reply = client_for(api.url, "k-two").chat.completions.create(
            model=api_stack.model, messages=message, max_tokens=2
        )
        assert reply.choices
        assert httpx.get(api.url + "/health").status_code == 200  # health needs no key


def test_oversized_body_gets_413(api_stack: ApiStack) -> None:
    with start_api(api_stack.controller_url, max_request_bytes=64 * 1024) as api:
        big = "data:image/png;base64," + "A" * (200 * 1024)
        with pytest.raises(openai.APIStatusError) as error:
            client_for(api.url).chat.completions.create(
                model=api_stack.model, messages=image_message("big", big)
            )
        assert error.value.status_code == 413


def test_no_worker_gives_503() -> None:
    empty = FakeControllerApp()
    with ServerThread(empty.app) as control, start_api(control.url) as api:
        with pytest.raises(openai.APIStatusError) as error:
            client_for(api.url).chat.completions.create(
                model="anything", messages=[{"role": "user", "content": "hi"}]
            )
        assert error.value.status_code == 503
        assert "no model worker" in error.value.message
    with start_api("http://127.0.0.1:9") as api:  # nothing listens on the discard port
        down = httpx.post(
            api.url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert down.status_code == 503 and "controller" in down.json()["error"]["message"]


@pytest.fixture(scope="module")
def image_host() -> Iterator[ServerThread]:
    app = FastAPI()

    @app.get("/red.png")
    async def red() -> Response:
        return Response(PNG, media_type="image/png")

    @app.get("/slow.png")
    async def slow() -> Response:
        await asyncio.sleep(2)
        return Response(PNG, media_type="image/png")

    @app.get("/big.png")
    async def big() -> Response:
        return Response(PNG + bytes(300_000), media_type="image/png")

    @app.get("/elsewhere")
    async def elsewhere(request: Request) -> Response:
        # Same server, but named "localhost": a host the allow-list does not name.
        return Response(
            status_code=302, headers={"location": f"http://localhost:{request.url.port}/red.png"}
        )

    with ServerThread(app) as server:
        yield server


def test_remote_images_are_fetched_only_when_allowed(
    api_stack: ApiStack, image_host: ServerThread
) -> None:
    url = image_host.url + "/red.png"
    question = image_message("What is it?", url)
    with pytest.raises(openai.BadRequestError, match="allow-remote-images"):
        client_for(api_stack.api_url).chat.completions.create(
            model=api_stack.model, messages=question
        )
    with (
        start_api(
            api_stack.controller_url, allow_remote_images=True, image_domains="example.com"
        ) as api,
        pytest.raises(openai.BadRequestError, match="allow-list"),
    ):
        client_for(api.url).chat.completions.create(model=api_stack.model, messages=question)
    with start_api(
        api_stack.controller_url,
        allow_remote_images=True,
        image_domains="127.0.0.1",
        allow_private_image_hosts=True,  # the test's image host is on loopback
    ) as api:
        client = client_for(api.url)
        fetched = client.chat.completions.create(
            model=api_stack.model, messages=question, temperature=0, max_tokens=6
        )
        inline = client.chat.completions.create(
            model=api_stack.model,
            messages=image_message("What is it?"),
            temperature=0,
            max_tokens=6,
        )
        assert fetched.choices[0].message.content == inline.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="404"):
            client.chat.completions.create(
                model=api_stack.model, messages=image_message("?", image_host.url + "/nope.png")
            )
        with pytest.raises(openai.BadRequestError, match="allow-list"):
            client.chat.completions.create(
                model=api_stack.model, messages=image_message("?", image_host.url + "/elsewhere")
            )


def test_remote_images_from_non_public_addresses_are_refused_without_saying_what_is_there(
    api_stack: ApiStack, image_host: ServerThread
) -> None:
    with start_api(api_stack.controller_url, allow_remote_images=True) as api:
        client = client_for(api.url)
        closed = f"http://127.0.0.1:{free_port()}/x.png"
        messages = []
        for url in (image_host.url + "/red.png", closed, "http://localhost:9/x.png"):
            with pytest.raises(openai.BadRequestError, match="not a public address") as refused:
                client.chat.completions.create(
                    model=api_stack.model, messages=image_message("?", url)
                )
            messages.append(str(refused.value).replace(url, "URL"))
        # An open port, a closed one and a name: one answer, nothing about what listens there.
        assert all("public hosts only" in m for m in messages)
        assert not any(word in m for m in messages for word in ("Connect", "refused", "404"))


def test_remote_images_have_a_time_limit_and_a_size_cap(
    api_stack: ApiStack, image_host: ServerThread
) -> None:
    with start_api(
        api_stack.controller_url,
        allow_remote_images=True,
        allow_private_image_hosts=True,
        image_fetch_timeout_s=0.5,
        max_remote_image_bytes=100_000,
    ) as api:
        client = client_for(api.url)
        with pytest.raises(openai.BadRequestError, match=r"longer than 0\.5 s"):
            client.chat.completions.create(
                model=api_stack.model, messages=image_message("?", image_host.url + "/slow.png")
            )
        with pytest.raises(openai.APIStatusError, match="larger than 100000 bytes") as big:
            client.chat.completions.create(
                model=api_stack.model, messages=image_message("?", image_host.url + "/big.png")
            )
        assert big.value.status_code == 413


def test_metrics_count_requests_tokens_and_latency(
    api_stack: ApiStack, client: openai.OpenAI
) -> None:
    client.chat.completions.create(
        model=api_stack.model, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    text = httpx.get(api_stack.api_url + "/metrics").text
    label = f'model_name="{api_stack.model}"'
    lines = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert lines[f"vilaserve:generation_tokens_total{{{label}}}"] >= 1
    assert lines[f"vilaserve:prompt_tokens_total{{{label}}}"] >= 1
    assert lines[f"vilaserve:time_to_first_token_seconds_count{{{label}}}"] >= 1
    assert lines[f"vilaserve:num_requests_running{{{label}}}"] == 0
    assert lines[f"vilaserve:num_requests_waiting{{{label}}}"] == 0
    assert any(k.startswith("vilaserve:request_success_total{") for k in lines)
    assert "# TYPE vilaserve:time_per_output_token_seconds histogram" in text
