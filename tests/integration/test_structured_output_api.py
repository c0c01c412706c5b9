"""Structured output and tool calls through the whole stack, driven by the official `openai`
client: client -> API -> controller -> a real worker whose llguidance masks hold the answer.

On the tiny random checkpoint (`api_stack`) an answer is valid only because of the constraint,
so the shapes of answers and every error are checked there. What needs a model that follows
its prompt (the `parse` helper, a picture plus a schema, JSON mode, which tool to call) runs on
the demo model (`demo_stack`, marked `demo`).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import llguidance
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field
from servers import ApiStack

from vilaserve.adapters.offline.demo import shapes
from vilaserve.domain.api.tool_call_parser import ToolCallParser, collect, read_answer
from vilaserve.domain.api.tool_definitions import ToolDefinition, tool_policy
from vilaserve.domain.api.tool_grammar import tool_call_grammar
from vilaserve.domain.api.tool_syntax import GENERIC_JSON, LLAMA3_JSON, ToolCallSyntax

# --- schemas and tools ----------------------------------------------------------------------


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=8)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    """Every rule the issue names: enum, integer bounds, a nested object, an array with
    minItems/maxItems, a string pattern, anyOf with null, additionalProperties false, required
    fields. Strings are bounded so that a 135M model's answer ends well within its budget."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Z][a-z]{1,8}$")
    age: int = Field(ge=18, le=99)
    role: Literal["admin", "user", "guest"]
    address: Address
    tags: list[Annotated[str, Field(max_length=6)]] = Field(min_length=1, max_length=3)
    manager: Annotated[str, Field(max_length=8)] | None


PERSON_KEYWORDS = {"enum", "minimum", "maximum", "$ref", "minItems", "maxItems", "pattern"}
PERSON_KEYWORDS |= {"anyOf", "additionalProperties", "required", "maxLength"}

# For the random model: every string bounded, so any answer ends within a few dozen tokens.
RECORD: dict[str, Any] = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "count": {"type": "integer", "minimum": 0, "maximum": 500},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["cat", "dog"]},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 4}]},
    },
    "required": ["code", "count", "ok", "kind", "note"],
    "additionalProperties": False,
}
PHONE = r"[0-9]{3}-[0-9]{4}"
ANSWERS = ["yes", "no", "maybe so"]


def function(name: str, parameters: dict[str, Any], description: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "parameters": parameters}
    if description:
        spec["description"] = description
    return {"type": "function", "function": spec}


def closed_object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


# One short function and a short system message (instead of Vicuna's own): the tiny
# checkpoint's tokenizer spends about a token per character, its context holds 512.
TINY_TOOLS = [
    function("pick", closed_object({"n": {"type": "integer", "minimum": 0, "maximum": 9}}))
]
TINY_CHAT = [{"role": "system", "content": "Hi."}, {"role": "user", "content": "Go."}]
WEATHER_TOOLS = [
    function(
        "get_weather",
        closed_object({"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}}),
        "The current weather in a city",
    ),
    function(
        "get_time",
        closed_object({"city": {"type": "string", "maxLength": 12}}),
        "The local time in a city",
    ),
]


# --- clients and answers --------------------------------------------------------------------


class RecordingClient:
    """An `openai.OpenAI` client that keeps the JSON body of every request it sends."""

    def __init__(self, url: str) -> None:
        self.sent: list[dict[str, Any]] = []
        hooks = {"request": [self._record]}
        self.http = httpx.Client(event_hooks=hooks, timeout=120)  # type: ignore[arg-type]
        self.openai = openai.OpenAI(
            base_url=url + "/v1", api_key="unused", max_retries=0, http_client=self.http
        )

    def _record(self, request: httpx.Request) -> None:
        if request.method == "POST":
            self.sent.append(json.loads(request.content))


@dataclass
class Served:
    client: openai.OpenAI
    model: str
    sent: list[dict[str, Any]]


def served(stack: ApiStack) -> Served:
    recording = RecordingClient(stack.api_url)
    model = recording.openai.models.list().data[0].id
    return Served(recording.openai, model, recording.sent)


@pytest.fixture(scope="module")
def tiny(api_stack: ApiStack) -> Served:
    return served(api_stack)


@pytest.fixture(scope="module")
def demo(demo_stack: ApiStack) -> Served:
    return served(demo_stack)


@dataclass
class Call:
    id: str
    name: str
    arguments: str


@dataclass
class Answer:
    content: str
    finish_reason: str | None
    calls: list[Call] = field(default_factory=list)


def answer_of(reply: Any) -> Answer:
    choice = reply.choices[0]
    calls = [
        Call(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []
    ]
    assert all(c.type == "function" for c in choice.message.tool_calls or [])
    return Answer(choice.message.content or "", choice.finish_reason, calls)


def streamed_answer(chunks: Iterable[Any]) -> Answer:
    """One choice's stream joined as a client joins it: content pieces, and each call's id and
    name from the delta that opens it and its arguments from the pieces, by index."""
    content: list[str] = []
    calls: dict[int, Call] = {}
    finish_reason = None
    for chunk in chunks:
        for choice in chunk.choices:
            assert finish_reason is None, "a chunk after the finish reason"
            delta = choice.delta
            content.append(delta.content or "")
            for piece in delta.tool_calls or []:
                if piece.index not in calls:
                    assert piece.id and piece.type == "function" and piece.function.name
                    assert piece.index == len(calls), "calls open in index order"
                    calls[piece.index] = Call(piece.id, "", "")
                else:
                    assert not piece.id, "a call's id comes once, in its first delta"
                call = calls[piece.index]
                if piece.function is not None:
                    call.name += piece.function.name or ""
                    call.arguments += piece.function.arguments or ""
            finish_reason = choice.finish_reason
    return Answer("".join(content), finish_reason, [calls[i] for i in sorted(calls)])


def ask(served: Served, stream: bool, **params: Any) -> Answer:
    reply = served.client.chat.completions.create(model=served.model, stream=stream, **params)
    return streamed_answer(reply) if stream else answer_of(reply)


def parameters_of(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {t["function"]["name"]: t["function"]["parameters"] for t in tools}


def assert_valid_calls(answer: Answer, tools: list[dict[str, Any]], at_most: int = 8) -> None:
    """Calls only, each of an offered function with arguments valid against its parameters,
    and the finish reason that says so."""
    assert answer.finish_reason == "tool_calls", answer
    assert 1 <= len(answer.calls) <= at_most, answer
    assert not answer.content, answer
    assert len({c.id for c in answer.calls}) == len(answer.calls)
    schemas = parameters_of(tools)
    for call in answer.calls:
        assert call.id.startswith("call_")
        assert call.name in schemas, call
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def assert_text_or_valid_calls(
    answer: Answer, tools: list[dict[str, Any]], at_most: int = 8
) -> None:
    """`auto`: the model chose either words (which then do not open a call) or calls."""
    if answer.calls:
        assert_valid_calls(answer, tools, at_most)
    else:
        assert answer.finish_reason in ("stop", "length"), answer
        assert answer.content and not answer.content.lstrip().startswith("{"), answer


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# --- the tiny random checkpoint: shapes of answers ------------------------------------------


@pytest.mark.parametrize(
    ("extra", "matches"),
    [
        ({"structured_outputs": {"regex": PHONE}}, lambda t: re.fullmatch(PHONE, t)),
        ({"guided_regex": PHONE}, lambda t: re.fullmatch(PHONE, t)),
        ({"structured_outputs": {"choice": ANSWERS}}, lambda t: t in ANSWERS),
        ({"guided_choice": ANSWERS}, lambda t: t in ANSWERS),
    ],
    ids=["structured_outputs.regex", "guided_regex", "structured_outputs.choice", "guided_choice"],
)
def test_a_regex_or_a_choice_holds_a_random_models_answer(
    tiny: Served, extra: dict[str, Any], matches: Any
) -> None:
    for seed in (1, 2):
        answer = ask(
            tiny,
            seed % 2 == 0,
            messages=user("Answer."),
            temperature=1.2,
            seed=seed,
            max_tokens=40,
            extra_body=extra,
        )
        assert answer.finish_reason == "stop" and matches(answer.content), answer


def test_a_schema_holds_a_random_models_answer_streamed_or_not(tiny: Served) -> None:
    common: dict[str, Any] = {
        "messages": user("A record, please."),
        "temperature": 1.2,
        "max_tokens": 200,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "record", "schema": RECORD, "strict": True},
        },
    }
    reply = tiny.client.chat.completions.create(model=tiny.model, n=2, seed=5, **common)
    answers = [choice.message.content or "" for choice in reply.choices]
    assert [choice.finish_reason for choice in reply.choices] == ["stop", "stop"], answers
    streamed = ask(tiny, True, seed=7, **common)
    assert streamed.finish_reason == "stop", streamed
    for text in [*answers, streamed.content]:
        jsonschema.validate(json.loads(text), RECORD)


def test_text_completions_take_a_constraint(tiny: Served) -> None:
    reply = tiny.client.completions.create(
        model=tiny.model,
        prompt="A record:",
        temperature=1.0,
        seed=3,
        max_tokens=200,
        extra_body={"structured_outputs": {"json": RECORD}},
    )
    assert reply.choices[0].finish_reason == "stop", reply
    jsonschema.validate(json.loads(reply.choices[0].text), RECORD)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    ("tool_choice", "parallel"),
    [
        ({"type": "function", "function": {"name": "pick"}}, None),
        ("required", False),
        ("auto", None),
    ],
    ids=["named", "required-one", "auto"],
)
def test_tool_calls_of_a_random_model_are_well_formed(
    tiny: Served, tool_choice: Any, parallel: bool | None, stream: bool
) -> None:
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    for seed in (1, 2):
        answer = ask(
            tiny,
            stream,
            messages=TINY_CHAT,
            tools=TINY_TOOLS,
            tool_choice=tool_choice,
            temperature=1.0,
            seed=seed,
            max_tokens=120,
            **extra,
        )
        if tool_choice == "auto":
            assert_text_or_valid_calls(answer, TINY_TOOLS)
            continue
        assert_valid_calls(answer, TINY_TOOLS, at_most=1)


# --- errors, before any generation -----------------------------------------------------------


def test_an_invalid_schema_is_a_400_naming_the_problem(tiny: Served) -> None:
    bad = {"type": "object", "properties": {"a": {"type": "nope"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        tiny.client.chat.completions.create(
            model=tiny.model,
            messages=user("hi"),
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}},
        )
    assert caught.value.param == "response_format.json_schema.schema"
    assert "$.properties.a.type" in caught.value.message
    assert "'nope'" in caught.value.message


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_regex_the_compiler_rejects_is_a_400_before_anything_streams(
    tiny: Served, endpoint: str, stream: bool
) -> None:
    extra = {"structured_outputs": {"regex": "("}}
    with pytest.raises(openai.BadRequestError) as caught:
        # The error comes with the reply's status: `create` raises, before any chunk is read.
        if endpoint == "chat":
            tiny.client.chat.completions.create(
                model=tiny.model, messages=user("hi"), stream=stream, extra_body=extra
            )
        else:
            tiny.client.completions.create(
                model=tiny.model, prompt="hi", stream=stream, extra_body=extra
            )
    message = caught.value.message
    assert 'invalid regex "("' in message and "unclosed group" in message, message


def test_a_tool_whose_parameters_are_not_an_object_schema_is_a_400(tiny: Served) -> None:
    tools = [*TINY_TOOLS, function("listing", {"type": "array", "items": {"type": "string"}})]
    with pytest.raises(openai.BadRequestError) as caught:
        tiny.client.chat.completions.create(model=tiny.model, messages=user("hi"), tools=tools)
    assert caught.value.param == "tools.1.function.parameters"
    assert "type 'object'" in caught.value.message and "'array'" in caught.value.message


# --- a call after whitespace (what a model samples decides nothing here) --------------------


class ByteVocabulary:
    """For llguidance: one token per byte, and an end token."""

    eos_token_id = 256
    bos_token_id = None
    special_token_ids = (256,)
    tokens = (*(bytes([i]) for i in range(256)), b"<eos>")

    def __call__(self, data: bytes) -> list[int]:
        return list(data)


def grammar_takes(grammar: str, answer: str) -> bool:
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(ByteVocabulary()))
    matcher = llguidance.LLMatcher(tokenizer, llguidance.grammar_from("lark", grammar))
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(tokenizer.tokenize_str(answer)) and matcher.is_accepting()


@pytest.mark.parametrize("syntax", [GENERIC_JSON, LLAMA3_JSON], ids=lambda s: s.name)
def test_under_auto_a_json_call_may_follow_whitespace_and_is_read_as_a_call(
    syntax: ToolCallSyntax,
) -> None:
    """A tokenizer whose " {" is one token (SmolLM2's) writes calls after a space: the grammar
    holds such an answer to the calls (never to free text that looks like one), and the parser,
    streamed or not, reads it as calls."""
    tools = tool_policy([ToolDefinition.model_validate(TINY_TOOLS[0])], "auto", None)
    assert tools is not None
    grammar = tool_call_grammar(syntax, tools)
    answer = " \n" + syntax.calls_text([("pick", '{"n": 3}')])
    assert grammar_takes(grammar, answer)
    assert not grammar_takes(grammar, ' {"n": 3}')  # not a call, so not text either
    assert grammar_takes(grammar, " It is 3.")
    read = read_answer(answer, syntax, ["pick"])
    assert read.content == "" and [(c.name, c.arguments) for c in read.calls] == [
        ("pick", '{"n": 3}')
    ]
    parser = ToolCallParser(syntax, ["pick"])
    events = [event for char in answer for event in parser.feed(char)] + parser.finish()
    streamed = collect(events)
    assert streamed.content == "" and [c.name for c in streamed.calls] == ["pick"]


# --- the demo model: what needs a model that follows its prompt ------------------------------


def schema_keywords(schema: Any) -> set[str]:
    if isinstance(schema, dict):
        return set(schema) | {k for v in schema.values() for k in schema_keywords(v)}
    if isinstance(schema, list):
        return {k for v in schema for k in schema_keywords(v)}
    return set()


@pytest.mark.demo
def test_parse_returns_the_pydantic_object_at_every_temperature(demo: Served) -> None:
    schema = Person.model_json_schema()
    parsed: list[Person] = []
    for temperature, seed, n in [(0.0, None, 1), (0.7, 1, 1), (1.2, 2, 2)]:
        completion = demo.client.chat.completions.parse(
            model=demo.model,
            messages=user("Describe one person."),
            response_format=Person,
            temperature=temperature,
            seed=seed,
            n=n,
            max_tokens=200,
        )
        sent = demo.sent[-1]["response_format"]["json_schema"]["schema"]
        assert schema_keywords(sent) >= PERSON_KEYWORDS  # what the client sent has every rule
        for choice in completion.choices:
            assert choice.finish_reason == "stop", choice
            assert isinstance(choice.message.parsed, Person), choice
            jsonschema.validate(json.loads(choice.message.content or ""), schema)
            parsed.append(choice.message.parsed)
    assert len(parsed) == 4


def picture_url(example: shapes.DemoExample) -> str:
    return "data:image/png;base64," + base64.b64encode(example.png()).decode()


@pytest.mark.demo
def test_a_picture_and_a_schema_give_the_pictures_colour_as_json(demo: Served) -> None:
    schema = closed_object({"colour": {"enum": list(shapes.COLOURS)}})
    examples = [e for e in shapes.examples("eval", 424_242, 40) if e.question_kind == "colour"]
    wrong = []
    for index, example in enumerate(examples[:3]):
        content = [
            {"type": "image_url", "image_url": {"url": picture_url(example)}},
            {"type": "text", "text": example.question},
        ]
        answer = ask(
            demo,
            index == 1,
            messages=[{"role": "user", "content": content}],
            temperature=0,
            max_tokens=40,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "colour", "schema": schema, "strict": True},
            },
        )
        assert answer.finish_reason == "stop", answer
        value = json.loads(answer.content)
        jsonschema.validate(value, schema)
        if value["colour"] != example.answer:
            wrong.append((example.answer, value))
    # The model names colours near-perfectly; many misses mean the picture did not reach it.
    assert len(wrong) <= 1, wrong


@pytest.mark.demo
def test_json_mode_answers_a_json_object(demo: Served) -> None:
    answer = ask(
        demo,
        False,
        messages=user("Describe a cat in JSON with its name and age."),
        response_format={"type": "json_object"},
        temperature=0.7,
        seed=1,
        max_tokens=200,
    )
    assert answer.finish_reason == "stop", answer
    assert isinstance(json.loads(answer.content), dict)


WEATHER_QUESTION = user("What is the weather in Paris right now? Use a tool.")


@pytest.mark.demo
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_required_and_named_tool_calls_parse_and_validate(demo: Served, stream: bool) -> None:
    one = ask(
        demo,
        stream,
        messages=WEATHER_QUESTION,
        tools=WEATHER_TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0.7,
        seed=3,
        max_tokens=120,
    )
    assert_valid_calls(one, WEATHER_TOOLS, at_most=1)
    named = ask(
        demo,
        stream,
        messages=WEATHER_QUESTION,
        tools=WEATHER_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=1.2,
        seed=4,
        max_tokens=120,
    )
    assert_valid_calls(named, WEATHER_TOOLS, at_most=1)
    assert named.calls[0].name == "get_time"


def earlier_call(number: int, city: str, degrees: int) -> list[dict[str, Any]]:
    """One earlier round: the question, the assistant's call, its result, the answer."""
    call_id = f"call_{number}"
    arguments = json.dumps({"city": city, "unit": "c"})
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }
    return [
        *user(f"What is the weather in {city}?"),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"degrees": degrees})},
        {"role": "assistant", "content": f"It is {degrees} degrees in {city}."},
    ]


# Two rounds that called the tool: the demo model then often calls it itself (alone, it
# answers in words), sometimes after a space (SmolLM2's " {" is one token).
SHOWN_HOW = [*earlier_call(1, "Oslo", 5), *earlier_call(2, "Rome", 18), *user("And in Paris?")]


@pytest.mark.demo
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_auto_answers_text_or_a_call_that_parses(demo: Served, stream: bool) -> None:
    for messages, seed in [(WEATHER_QUESTION, 1), (SHOWN_HOW, 1), (SHOWN_HOW, 2)]:
        answer = ask(
            demo,
            stream,
            messages=messages,
            tools=WEATHER_TOOLS,
            parallel_tool_calls=False,
            temperature=0.7,
            seed=seed,
            max_tokens=60,
        )
        assert_text_or_valid_calls(answer, WEATHER_TOOLS, at_most=1)


@pytest.mark.demo
def test_a_tool_result_is_accepted_and_answered(demo: Served) -> None:
    first = demo.client.chat.completions.create(
        model=demo.model,
        messages=WEATHER_QUESTION,
        tools=WEATHER_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=120,
    )
    message = first.choices[0].message
    assert message.tool_calls and first.choices[0].finish_reason == "tool_calls"
    result = {
        "role": "tool",
        "tool_call_id": message.tool_calls[0].id,
        "content": '{"temperature_c": 21, "sky": "clear"}',
    }
    # The assistant's message goes back as the client received it, as OpenAI's docs show.
    messages: list[Any] = [*WEATHER_QUESTION, message, result]
    for tool_choice, stream in [("auto", False), ("none", True)]:
        answer = ask(
            demo,
            stream,
            messages=messages,
            tools=WEATHER_TOOLS,
            tool_choice=tool_choice,
            temperature=0,
            max_tokens=40,
        )
        if tool_choice == "auto":
            assert_text_or_valid_calls(answer, WEATHER_TOOLS)
        else:  # no tools offered: text, unconstrained (it may well start with "{")
            assert answer.content and not answer.calls, answer
            assert answer.finish_reason in ("stop", "length"), answer
    # The client sent the call back as it received it (its id), with the result after it.
    assert demo.sent[-1]["messages"][1]["tool_calls"][0]["id"] == message.tool_calls[0].id
