"""The worker's HTTP protocol with fakes behind the container: framing, endpoints, errors."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys

import pytest
from fakes import FAKE_PNG_B64, FakeTextGenerator
from fastapi.testclient import TestClient

from vilaserve.domain.shared.errors import ErrorCode

JSON = {"content-type": "application/json"}


def frames(raw: bytes) -> list[dict]:
    return [json.loads(part) for part in raw.split(b"\0") if part]


def test_stream_is_nul_delimited_cumulative_json_tinychat_style(client: TestClient) -> None:
    prompt = "A chat. USER: <image>\nWhat is this? ASSISTANT:"
    body = {
        "model": "VILA1.5-3b",
        "prompt": prompt,
        "temperature": 0.2,
        "top_p": 1.0,
        "max_new_tokens": 512,
        "stop": "</s>",
        "images": [FAKE_PNG_B64],
    }
    with client.stream("POST", "/worker_generate_stream", json=body) as response:
        assert response.status_code == 200
        raw = b"".join(response.iter_bytes())
    chunks = frames(raw)
    assert all(c["error_code"] == 0 for c in chunks)
    # TinyChat's web server strips the prompt by length and shows the rest.
    assert [c["text"][len(prompt) :].strip() for c in chunks][-1] == "Hello, world!"
    assert chunks[-1]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["total_tokens"] == chunks[-1]["usage"]["prompt_tokens"] + 4


def test_worker_generate_returns_the_final_chunk(client: TestClient) -> None:
    response = client.post("/worker_generate", json={"prompt": "q", "echo": False})
    assert response.status_code == 200
    assert response.json()["text"] == "Hello, world!"
    assert response.json()["finish_reason"] == "stop"


def test_status_count_details_and_template(client: TestClient) -> None:
    assert client.post("/worker_get_status").json() == {
        "model_names": ["VILA1.5-3b"],
        "speed": 1,
        "queue_length": 0,
    }
    count = client.post("/count_token", json={"model": "m", "prompt": "<image>\nhow many"})
    assert count.json() == {"count": 2 + 4, "error_code": 0}
    assert client.post("/model_details", json={"model": "m"}).json()["context_length"] == 64
    conv = client.post("/worker_get_conv_template", json={"model": "m"}).json()["conv"]
    assert conv["name"] == "vicuna_v1"
    assert conv["sep_style"] == 2 and conv["sep2"] == "</s>"
    assert client.get("/health").json() == {"status": "ok"}


def test_bad_inputs_get_clear_errors_and_the_worker_keeps_serving(client: TestClient) -> None:
    cases = [
        (b"{not json", ErrorCode.VALIDATION_TYPE_ERROR, "not valid JSON"),
        (b"", ErrorCode.VALIDATION_TYPE_ERROR, "empty"),
        (json.dumps({"images": []}).encode(), ErrorCode.VALIDATION_TYPE_ERROR, "'prompt'"),
        (
            json.dumps({"prompt": "<image>", "images": ["%%%"]}).encode(),
            ErrorCode.VALIDATION_TYPE_ERROR,
            "not valid base64",
        ),
        (
            json.dumps({"prompt": "<image><image>", "images": [FAKE_PNG_B64]}).encode(),
            ErrorCode.VALIDATION_TYPE_ERROR,
            "2 '<image>' placeholders but 1 images",
        ),
        (json.dumps({"prompt": "q", "top_p": 2}).encode(), ErrorCode.PARAM_OUT_OF_RANGE, "top_p"),
        (
            json.dumps({"prompt": "q", "temperature": -1}).encode(),
            ErrorCode.PARAM_OUT_OF_RANGE,
            "temperature",
        ),
    ]
    for raw, code, message in cases:
        response = client.post("/worker_generate_stream", content=raw, headers=JSON)
        assert response.status_code == 400, raw
        [chunk] = frames(response.content)
        assert chunk["error_code"] == code, raw
        assert message in chunk["text"], (raw, chunk["text"])
    ok = client.post("/worker_generate", json={"prompt": "q", "echo": False})
    assert ok.json()["text"] == "Hello, world!"


def test_refusals_before_the_first_token_are_4xx_and_later_failures_framed(
    client: TestClient, generator: FakeTextGenerator
) -> None:
    not_an_image = {"prompt": "<image>", "images": ["aGVsbG8="]}
    response = client.post("/worker_generate_stream", json=not_an_image)
    [chunk] = frames(response.content)
    assert response.status_code == 400
    assert chunk["error_code"] == ErrorCode.VALIDATION_TYPE_ERROR
    assert "could not be decoded" in chunk["text"]
    too_long = {"prompt": " ".join(["w"] * 100)}
    response = client.post("/worker_generate_stream", json=too_long)
    assert response.status_code == 400
    assert frames(response.content)[-1]["error_code"] == ErrorCode.CONTEXT_OVERFLOW
    generator.fail_after = 1  # after the first token: the stream has started, it ends framed
    response = client.post("/worker_generate_stream", json={"prompt": "q"})
    chunks = frames(response.content)
    assert response.status_code == 200 and chunks[0]["error_code"] == 0
    assert chunks[-1]["error_code"] == ErrorCode.INTERNAL_ERROR
    generator.fail_after = None
    assert client.post("/worker_generate", json={"prompt": "q"}).status_code == 200


def test_count_token_without_prompt_is_an_error(client: TestClient) -> None:
    response = client.post("/count_token", json={"model": "m"})
    assert response.status_code == 400
    assert response.json()["error_code"] == ErrorCode.VALIDATION_TYPE_ERROR


def test_the_container_and_app_import_no_torch() -> None:
    code = (
        "import sys\n"
        "from vilaserve.entrypoints.worker.container import WorkerContainer\n"
        "from vilaserve.entrypoints.worker.app import create_worker_app\n"
        "import vilaserve.application.worker.generate_stream\n"
        "import vilaserve.application.worker.heartbeat\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_logs_never_carry_image_payloads(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    secret = base64.b64encode(b"\x89PNG" + b"S3CRET-PIXELS" * 20).decode()
    not_png = base64.b64encode(b"S3CRET-PIXELS" * 20).decode()
    with caplog.at_level(logging.DEBUG):
        client.post("/worker_generate", json={"prompt": "<image>", "images": [secret]})
        client.post("/worker_generate", json={"prompt": "<image>", "images": [not_png]})
        client.post("/worker_generate", json={"prompt": "q", "images": [secret]})
    assert caplog.records  # the failures were logged ...
    for record in caplog.records:
        text = record.getMessage() + " " + " ".join(str(v) for v in vars(record).values())
        assert secret[:40] not in text and not_png[:40] not in text  # ... without the images


def test_oversized_and_deeply_nested_bodies_are_refused_clearly(client: TestClient) -> None:
    big = b'{"prompt": "' + b"x" * (65 * 1024 * 1024) + b'"}'
    response = client.post("/worker_generate_stream", content=big, headers=JSON)
    assert response.status_code == 413
    assert "limit" in frames(response.content)[0]["text"]
    deep = b"[" * 100_000 + b"]" * 100_000
    response = client.post("/worker_generate", content=deep, headers=JSON)
    assert response.status_code == 400
    assert "nested too deeply" in response.json()["text"]
