"""Property-based fuzzing of every JSON endpoint of the worker, the controller and the API (fakes
behind the containers): whatever JSON arrives, the answer is a 2xx or a 4xx naming the problem,
never a 5xx, and the next well-formed request is served. A fixed budget here; raise
`FUZZ_EXAMPLES` for a longer run."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = (
    "prompt", "images", "temperature", "top_p", "top_k", "max_new_tokens", "stop",
    "stop_token_ids", "seed", "echo", "model", "worker_name", "worker_status", "queue_length",
    "check_heart_beat", "multimodal", "leaving", "model_names", "speed", "messages", "role",
    "content", "max_tokens", "n", "stream", "logprobs", "type", "image_url", "url", "text",
)  # fmt: skip
bodies = values | st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)

WORKER_PATHS = ("/worker_generate_stream", "/worker_generate", "/count_token")
CONTROLLER_PATHS = ("/register_worker", "/receive_heart_beat", "/get_worker_address",
                    "/worker_generate_stream")  # fmt: skip


def answers_well(client: TestClient, path: str, body: Any) -> None:
    raw = json.dumps(body, allow_nan=True).encode()
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code < 500 or response.status_code == 503, (path, body, response.text)


@pytest.mark.parametrize("path", WORKER_PATHS)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_the_worker_never_fails_on_a_body(client: TestClient, path: str, body: Any) -> None:
    answers_well(client, path, body)
    assert client.post("/worker_generate", json={"prompt": "q"}).status_code == 200


@pytest.mark.parametrize("path", CONTROLLER_PATHS)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_the_controller_never_fails_on_a_body(path: str, body: Any) -> None:
    from dependency_injector import providers
    from test_controller_http import FakeGateway

    from vilaserve.entrypoints.controller.app import create_controller_app
    from vilaserve.entrypoints.controller.container import ControllerContainer
    from vilaserve.entrypoints.controller.settings import ControllerSettings

    container = ControllerContainer(settings=ControllerSettings(log_format="text"))
    container.worker_gateway.override(providers.Object(FakeGateway()))
    with TestClient(create_controller_app(container)) as client:
        answers_well(client, path, body)
        assert client.post("/list_models").status_code == 200


API_PATHS = ("/v1/chat/completions", "/v1/completions")
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]), "content": values}
    ),
    max_size=3,
)
api_bodies = bodies | st.fixed_dictionaries(
    {"model": st.just("VILA1.5-3b") | st.text(max_size=8), "messages": messages},
    optional={"max_tokens": values, "temperature": values, "stream": values, "n": values},
)


@pytest.mark.parametrize("path", API_PATHS)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=api_bodies)
def test_the_api_never_fails_on_a_body(path: str, body: Any) -> None:
    from api_fakes import chat_body, fake_api

    with fake_api() as api:
        raw = json.dumps(body, allow_nan=True).encode()
        response = api.client.post(path, content=raw, headers={"content-type": "application/json"})
        assert response.status_code < 500, (path, body, response.text)
        if response.status_code != 200:  # an OpenAI-shaped error naming the problem
            assert response.json()["error"]["message"]
        assert api.client.post("/v1/chat/completions", json=chat_body()).status_code == 200
