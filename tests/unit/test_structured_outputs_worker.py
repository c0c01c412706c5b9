"""The worker protocol's `structured_outputs` with fakes behind the container: each kind is
parsed and reaches the generator compiled; each bad shape or constraint that does not compile
is refused before generation (400, one frame naming the problem); a request without the field
is answered byte for byte as before the field existed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fakes import BAD_REGEX, FAKE_PNG_B64, FakeConstraintCompiler, FakeTextGenerator
from fastapi.testclient import TestClient

from vilaserve.domain.shared.errors import ErrorCode, InvalidRequest
from vilaserve.domain.shared.generation import (
    OutputConstraint,
    parse_generation_request,
    parse_output_constraint,
)
from vilaserve.entrypoints.worker.container import WorkerContainer

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}


def frames(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(part) for part in raw.split(b"\0") if part]


@pytest.mark.parametrize(
    ("given", "kind", "spec"),
    [
        ({"json": SCHEMA}, "json", json.dumps(SCHEMA, separators=(",", ":"))),
        ({"json": json.dumps(SCHEMA)}, "json", json.dumps(SCHEMA, separators=(",", ":"))),
        ({"json_object": True}, "json_object", ""),
        ({"regex": "[0-9]{3}"}, "regex", "[0-9]{3}"),
        ({"choice": ["yes", "no"]}, "choice", '["yes", "no"]'),
        ({"grammar": 'start: "a"+'}, "grammar", 'start: "a"+'),
        # Clients that serialize every field send the kinds they do not use as null.
        ({"regex": "a", "json": None, "choice": None}, "regex", "a"),
    ],
)
def test_each_kind_is_read_into_a_constraint(given: dict, kind: str, spec: str) -> None:
    assert parse_output_constraint(given) == OutputConstraint(kind, spec)  # type: ignore[arg-type]


def test_a_schema_keeps_its_property_order_and_equal_constraints_share_a_key() -> None:
    reordered = {"type": "object", "properties": {"b": {}, "a": {}}}
    parsed = parse_output_constraint({"json": reordered})
    assert parsed is not None and parsed.spec.index('"b"') < parsed.spec.index('"a"')
    # Whitespace in a schema sent as text does not make it another constraint.
    spaced = parse_output_constraint({"json": json.dumps(reordered, indent=4)})
    assert spaced is not None and spaced.key == parsed.key
    other = parse_output_constraint({"regex": parsed.spec})
    assert other is not None and other.key != parsed.key


def test_without_the_field_there_is_no_constraint() -> None:
    assert parse_generation_request({"prompt": "q"}).constraint is None
    assert parse_generation_request({"prompt": "q", "structured_outputs": None}).constraint is None


BAD_SHAPES = [
    ("a string", "'structured_outputs' must be an object"),
    ({}, "'structured_outputs' must have exactly one of"),
    ({"json": None}, "it has none"),
    ({"regex": "a", "choice": ["a"]}, "it has 'regex', 'choice'"),
    ({"guided_json": SCHEMA}, "unknown key(s) 'guided_json'"),
    ({"json": "{not json"}, "'structured_outputs.json' is not valid JSON"),
    ({"json": "[" * 5000 + "]" * 5000}, "'structured_outputs.json' is nested too deeply"),
    ({"json": [1, 2]}, "'structured_outputs.json' must be a JSON schema"),
    ({"json": "[1, 2]"}, "'structured_outputs.json' must be a JSON schema"),
    ({"json_object": False}, "'structured_outputs.json_object' must be true"),
    ({"regex": 5}, "'structured_outputs.regex' must be a non-empty string"),
    ({"regex": ""}, "'structured_outputs.regex' must be a non-empty string"),
    ({"choice": []}, "'structured_outputs.choice' must be a non-empty list of strings"),
    ({"choice": "yes"}, "'structured_outputs.choice' must be a non-empty list of strings"),
    ({"choice": ["yes", 1]}, "'structured_outputs.choice' must be a non-empty list of strings"),
    ({"grammar": ["start"]}, "'structured_outputs.grammar' must be a non-empty string"),
]


@pytest.mark.parametrize(("given", "message"), BAD_SHAPES)
def test_each_bad_shape_is_refused_naming_the_field(given: Any, message: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_output_constraint(given)
    assert message in refused.value.message


@pytest.mark.parametrize("path", ["/worker_generate_stream", "/worker_generate"])
@pytest.mark.parametrize(("given", "message"), BAD_SHAPES)
def test_a_bad_shape_gets_400_and_one_error_frame_before_any_generation(
    client: TestClient, generator: FakeTextGenerator, path: str, given: Any, message: str
) -> None:
    response = client.post(path, json={"prompt": "q", "structured_outputs": given})
    assert response.status_code == 400
    [chunk] = frames(response.content)
    assert chunk["error_code"] == ErrorCode.VALIDATION_TYPE_ERROR
    assert message in chunk["text"]
    assert generator.calls == []


def test_a_constraint_that_does_not_compile_gets_400_before_any_generation(
    client: TestClient, generator: FakeTextGenerator
) -> None:
    body = {"prompt": "q", "structured_outputs": {"regex": BAD_REGEX}}
    response = client.post("/worker_generate_stream", json=body)
    assert response.status_code == 400
    [chunk] = frames(response.content)
    assert chunk["error_code"] == ErrorCode.VALIDATION_TYPE_ERROR
    assert chunk["text"] == "'structured_outputs.regex' cannot be used: unclosed group"
    assert generator.calls == []
    assert generator.admission.queue_length == 0  # it left the queue it was admitted to
    ok = client.post("/worker_generate", json={"prompt": "q", "echo": False})
    assert ok.json()["text"] == "Hello, world!"


def test_each_kind_reaches_the_generator_compiled_off_the_event_loop(
    client: TestClient, generator: FakeTextGenerator, container: WorkerContainer
) -> None:
    compiler = container.constraint_compiler()
    assert isinstance(compiler, FakeConstraintCompiler)
    kinds = [
        {"json": SCHEMA},
        {"json_object": True},
        {"regex": "[a-z]+"},
        {"choice": ["a", "b"]},
        {"grammar": "start: /x/"},
    ]
    for given in kinds:
        body = {"prompt": "q", "echo": False, "structured_outputs": given}
        response = client.post("/worker_generate_stream", json=body)
        assert response.status_code == 200
        assert frames(response.content)[-1]["text"] == "Hello, world!"
    assert [c.kind for c in compiler.compiled] == [next(iter(k)) for k in kinds]
    assert [c.constraint if c else None for c in generator.constraints] == compiler.compiled
    assert "MainThread" not in compiler.threads
    # A picture and a schema in one request.
    body = {
        "prompt": "<image>\nq",
        "images": [FAKE_PNG_B64],
        "structured_outputs": {"json": SCHEMA},
    }
    assert client.post("/worker_generate", json=body).status_code == 200


def test_a_dead_ended_constraint_ends_the_answer_with_grammar_error_and_no_error_code(
    client: TestClient, generator: FakeTextGenerator
) -> None:
    generator.last_finish = "grammar_error"
    body = {"prompt": "q", "echo": False, "structured_outputs": {"regex": "a"}}
    chunks = frames(client.post("/worker_generate_stream", json=body).content)
    assert chunks[-1]["finish_reason"] == "grammar_error"
    assert chunks[-1]["error_code"] == 0
    assert chunks[-1]["text"] == "Hello, world!"  # the text so far is kept


# Recorded before `structured_outputs` existed (commit 21dc0d6, these fakes): the bytes a
# request without the field gets must not change.
RECORDED = [
    (
        "/worker_generate_stream",
        {
            "prompt": "USER: <image>\nhi ASSISTANT:",
            "images": [FAKE_PNG_B64],
            "temperature": 0.2,
            "max_new_tokens": 3,
            "stop": "</s>",
        },
        200,
        b'{"text": "USER: <image>\\nhi ASSISTANT:Hello", "error_code": 0, "usage": '
        b'{"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}, "finish_reason": '
        b'null}\x00{"text": "USER: <image>\\nhi ASSISTANT:Hello,", "error_code": 0, "usage": '
        b'{"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}, "finish_reason": '
        b'null}\x00{"text": "USER: <image>\\nhi ASSISTANT:Hello, world", "error_code": 0, '
        b'"usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}, '
        b'"finish_reason": "length"}\x00',
    ),
    (
        "/worker_generate_stream",
        {"prompt": "q", "echo": False},
        200,
        b'{"text": "Hello", "error_code": 0, "usage": {"prompt_tokens": 1, "completion_tokens": '
        b'1, "total_tokens": 2}, "finish_reason": null}\x00{"text": "Hello,", "error_code": 0, '
        b'"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, '
        b'"finish_reason": null}\x00{"text": "Hello, world", "error_code": 0, "usage": '
        b'{"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}, "finish_reason": '
        b'null}\x00{"text": "Hello, world!", "error_code": 0, "usage": {"prompt_tokens": 1, '
        b'"completion_tokens": 4, "total_tokens": 5}, "finish_reason": "stop"}\x00',
    ),
    (
        "/worker_generate",
        {"prompt": "q", "echo": False},
        200,
        b'{"text":"Hello, world!","error_code":0,"usage":{"prompt_tokens":1,'
        b'"completion_tokens":4,"total_tokens":5},"finish_reason":"stop"}',
    ),
    (
        "/worker_generate_stream",
        {"prompt": "q", "top_p": 2},
        400,
        b'{"text": "top_p must be in (0, 1], got 2.0", "error_code": 40302, "usage": null, '
        b'"finish_reason": null}\x00',
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "raw"), RECORDED)
def test_a_request_without_the_field_gets_the_same_bytes_as_before(
    client: TestClient,
    container: WorkerContainer,
    path: str,
    body: dict,
    status: int,
    raw: bytes,
) -> None:
    response = client.post(path, json=body)
    assert (response.status_code, response.content) == (status, raw)
    assert container.constraint_compiler().compiled == []
