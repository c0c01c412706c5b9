"""Structured output through the OpenAI API: every spelling of a constraint, the 400s before any
work, the worker payload's `structured_outputs`, the worker's refusals and `grammar_error`, and
the official client's `parse` helper (on fakes: the worker's compiler is not here)."""

from __future__ import annotations

import json
from typing import Any

import openai
import pydantic
import pytest
from api_fakes import MODEL, FakeWorkerGateway, chat_body, fake_api, sse_events

from vilaserve.domain.api.errors import BadRequest
from vilaserve.domain.api.openai_requests import parse_chat_request, parse_completion_request
from vilaserve.domain.api.structured_outputs import StructuredOutput
from vilaserve.domain.api.worker_jobs import WorkerJob
from vilaserve.domain.shared.errors import ErrorCode

SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "blue"]}, "count": {"type": "integer"}},
    "required": ["color", "count"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object", True)),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": SCHEMA},
                }
            },
            StructuredOutput("json", SCHEMA),
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
            StructuredOutput("json_object", True),
        ),
        ({"structured_outputs": {"json": SCHEMA}}, StructuredOutput("json", SCHEMA)),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, StructuredOutput("json", SCHEMA)),
        ({"structured_outputs": {"json_object": True}}, StructuredOutput("json_object", True)),
        ({"structured_outputs": {"regex": "[0-9]{3}"}}, StructuredOutput("regex", "[0-9]{3}")),
        (
            {"structured_outputs": {"choice": ["yes", "no"]}},
            StructuredOutput("choice", ("yes", "no")),
        ),
        (
            {"structured_outputs": {"grammar": 'start: "a"'}},
            StructuredOutput("grammar", 'start: "a"'),
        ),
        ({"guided_json": json.dumps(SCHEMA)}, StructuredOutput("json", SCHEMA)),
        ({"guided_regex": "a+"}, StructuredOutput("regex", "a+")),
        ({"guided_choice": ["x"]}, StructuredOutput("choice", ("x",))),
        ({"guided_grammar": 'start: "b"'}, StructuredOutput("grammar", 'start: "b"')),
        ({"structured_outputs": {"json_object": False}}, None),
        ({}, None),
    ],
)
def test_every_spelling_of_a_constraint(fields: dict[str, Any], expected: Any) -> None:
    assert parse_chat_request(chat(**fields)).output_constraint == expected


def test_text_completions_take_vllms_constraints() -> None:
    request = parse_completion_request({"model": "m", "prompt": "x", "guided_choice": ["a", "b"]})
    assert request.output_constraint == StructuredOutput("choice", ("a", "b"))
    with pytest.raises(BadRequest, match="guided_json"):
        parse_completion_request({"model": "m", "prompt": "x", "guided_json": "{not json"})


@pytest.mark.parametrize(
    ("fields", "says", "param"),
    [
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "'response_format' and 'guided_regex'",
            "guided_regex",
        ),
        (
            {"structured_outputs": {"regex": "a", "choice": ["a"]}},
            "'structured_outputs.regex' and 'structured_outputs.choice'",
            "structured_outputs.choice",
        ),
        (
            {"response_format": {"type": "json_object"}, "tools": [WEATHER_TOOL]},
            "'response_format' and 'tools'",
            "response_format",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "integr"}},
                }
            },
            "$.type",
            "response_format.json_schema.schema",
        ),
        ({"guided_json": "{not json"}, "not valid JSON", "guided_json"),
        ({"guided_json": "[1, 2]"}, "JSON Schema object", "guided_json"),
        (
            {"structured_outputs": {"json": {"required": "a"}}},
            "$.required",
            "structured_outputs.json",
        ),
        (
            {"structured_outputs": {"structural_tag": "x"}},
            "not supported",
            "structured_outputs.structural_tag",
        ),
        (
            {"structured_outputs": {"choice": []}},
            "structured_outputs.choice",
            "structured_outputs.choice",
        ),
        ({"guided_regex": ""}, "guided_regex", "guided_regex"),
        ({"response_format": {"type": "grammar"}}, "response_format", "response_format"),
    ],
)
def test_bad_constraints_are_a_400_naming_the_parameter(
    fields: dict[str, Any], says: str, param: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_chat_request(chat(**fields))
    assert says in caught.value.message
    assert caught.value.param == param


def test_a_pattern_python_cannot_compile_is_left_to_the_workers_compiler() -> None:
    # `\p{L}` is a Unicode class for Rust's regex (llguidance), an error for Python's `re`.
    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": r"\p{L}+"}}}
    request = parse_chat_request(chat(guided_json=schema, guided_regex=None))
    assert request.output_constraint == StructuredOutput("json", schema)
    assert parse_chat_request(chat(guided_regex=r"\p{L}+")).output_constraint is not None


# --- the worker payload ------------------------------------------------------------------


def test_the_payload_without_a_constraint_is_unchanged_byte_for_byte() -> None:
    job = WorkerJob(model="m", prompt="p", seed=3)
    assert json.dumps(job.to_payload()) == (
        '{"model": "m", "prompt": "p", "temperature": 1.0, "top_p": 1.0, "top_k": -1, '
        '"max_new_tokens": 256, "stop": [], "stop_token_ids": [], "echo": false, "seed": 3}'
    )


@pytest.mark.parametrize(
    ("constraint", "sent"),
    [
        (StructuredOutput("json", SCHEMA), {"json": SCHEMA}),
        (StructuredOutput("json_object", True), {"json_object": True}),
        (StructuredOutput("regex", "a+"), {"regex": "a+"}),
        (StructuredOutput("choice", ("yes", "no")), {"choice": ["yes", "no"]}),
        (StructuredOutput("grammar", 'start: "a"'), {"grammar": 'start: "a"'}),
    ],
)
def test_the_payload_carries_the_constraint(constraint: StructuredOutput, sent: Any) -> None:
    plain = WorkerJob(model="m", prompt="p").to_payload()
    payload = WorkerJob(model="m", prompt="p", constraint=constraint).to_payload()
    assert payload == {**plain, "structured_outputs": sent}
    assert WorkerJob(model="m", prompt="p", seed=1, constraint=constraint).for_choice(1).constraint


def test_each_choice_and_each_prompt_carries_the_constraint_over_http() -> None:
    with fake_api() as api:
        body = chat_body(
            n=2,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
        )
        assert api.client.post("/v1/chat/completions", json=body).status_code == 200
        completion = {"model": MODEL, "prompt": ["a", "b"], "structured_outputs": {"regex": "x"}}
        assert api.client.post("/v1/completions", json=completion).status_code == 200
        assert api.client.post("/v1/chat/completions", json=chat_body()).status_code == 200
        sent = [p.get("structured_outputs") for p in api.workers.payloads]
        assert sent == [{"json": SCHEMA}] * 2 + [{"regex": "x"}] * 2 + [None]


# --- what the worker says back -----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_constraint_the_workers_compiler_refuses_is_a_400_before_any_stream(stream: bool) -> None:
    refusal = (int(ErrorCode.VALIDATION_TYPE_ERROR), "structured_outputs.regex: unclosed group")
    with fake_api(workers=FakeWorkerGateway(refuse=refusal)) as api:
        body = chat_body(stream=stream, structured_outputs={"regex": "(a"})
        response = api.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["message"] == "structured_outputs.regex: unclosed group"
        assert error["code"] == ErrorCode.VALIDATION_TYPE_ERROR


@pytest.mark.parametrize("stream", [False, True])
def test_grammar_error_reaches_the_client_as_the_finish_reason(stream: bool) -> None:
    workers = FakeWorkerGateway(reply=('{"color": ', '"re'), finish="grammar_error")
    with fake_api(workers=workers) as api:
        body = chat_body(stream=stream, guided_json=SCHEMA)
        response = api.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        if stream:
            events = sse_events(response.text)
            reasons = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
            assert reasons[-1] == "grammar_error"
        else:
            choice = response.json()["choices"][0]
            assert choice["finish_reason"] == "grammar_error"
            assert choice["message"]["content"] == '{"color": "re'  # the text so far is kept


# --- the official client -----------------------------------------------------------------


class Picture(pydantic.BaseModel):
    color: str
    count: int


def test_the_openai_clients_parse_returns_the_pydantic_object() -> None:
    workers = FakeWorkerGateway(reply=('{"color": ', '"red", ', '"count": 3}'))
    with fake_api(workers=workers) as api:
        client = openai.OpenAI(
            base_url="http://testserver/v1", api_key="x", http_client=api.client, max_retries=0
        )
        completion = client.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": "How many shapes, and which color?"}],
            response_format=Picture,
        )
        assert completion.choices[0].message.parsed == Picture(color="red", count=3)
        sent = api.workers.payloads[0]["structured_outputs"]["json"]
        assert sent["properties"].keys() == {"color", "count"}
        assert sent["additionalProperties"] is False  # the client's strict schema, as sent
