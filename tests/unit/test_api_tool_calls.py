"""Tool calls through the OpenAI API: the request's tools, the grammar per template syntax (held
by llguidance on a byte-level vocabulary), the prompt, reading calls out of whole and streamed
answers, and the official client's calls and streamed deltas (on fakes)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import llguidance
import openai
import pydantic
import pytest
from api_fakes import MODEL, PNG_DATA_URL, FakeWorkerGateway, chat_body, fake_api, sse_events
from jinja2.exceptions import TemplateError

from vilaserve.adapters.shared.jinja_chat_template import JinjaChatTemplateRenderer
from vilaserve.domain.api.chat_prompt import build_chat_prompt
from vilaserve.domain.api.control_tokens import MARKER_BREAK
from vilaserve.domain.api.errors import BadRequest
from vilaserve.domain.api.openai_requests import ChatMessage, parse_chat_request
from vilaserve.domain.api.tool_call_parser import ToolCallParser, collect, read_answer
from vilaserve.domain.api.tool_definitions import ToolPolicy
from vilaserve.domain.api.tool_grammar import tool_call_grammar
from vilaserve.domain.api.tool_syntax import (
    GENERIC_JSON,
    HERMES,
    LLAMA3_JSON,
    ToolCallSyntax,
    tool_convention_for,
)
from vilaserve.domain.shared.conversation import TEMPLATES, LlmShape, choose_template

SYNTAXES = [HERMES, LLAMA3_JSON, GENERIC_JSON]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now"}}
# A small chat template in the shape of Qwen2.5's: it renders tools, calls and results itself.
TOOL_JINJA = (
    "{% if tools %}<|im_start|>system\n{{ messages[0]['content'] }}\n<tools>\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% if not tools %}<|im_start|>system\n{{ m['content'] }}"
    "<|im_end|>\n{% endif %}"
    "{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n"
    "</tool_response><|im_end|>\n"
    "{% elif m['tool_calls'] is defined %}<|im_start|>assistant\n{{ m['content'] }}"
    "{% for c in m['tool_calls'] %}<tool_call>\n{\"name\": \"{{ c['function']['name'] }}\", "
    "\"arguments\": {{ c['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}"
    "<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def policy(choice: Any = None, parallel: bool | None = None) -> ToolPolicy:
    fields: dict[str, Any] = {"tools": [WEATHER, CLOCK], "parallel_tool_calls": parallel}
    if choice is not None:
        fields["tool_choice"] = choice
    found = parse_chat_request(chat(**fields)).tool_policy
    assert found is not None
    return found


def messages(*raw: dict[str, Any]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in raw]


# --- the request -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "says", "param"),
    [
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "integr"}},
                    }
                ]
            },
            "$.type",
            "tools.0.function.parameters",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
                ]
            },
            "type 'object'",
            "tools.0.function.parameters",
        ),
        (
            {
                "tools": [
                    CLOCK,
                    {
                        "type": "function",
                        "function": {"name": "g", "parameters": {"properties": 1}},
                    },
                ]
            },
            "$.properties",
            "tools.1.function.parameters",
        ),
        ({"tool_choice": "auto"}, "only allowed when 'tools'", "tool_choice"),
        ({"tools": [], "tool_choice": "required"}, "only allowed when 'tools'", "tool_choice"),
        (
            {"tools": [CLOCK], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "'nope', which is not among the tools (now)",
            "tool_choice",
        ),
        ({"tools": [CLOCK, CLOCK]}, "'now' twice", "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "pattern",
            "tools.0.function.name",
        ),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type", "tools.0.type"),
        (
            {"tools": [CLOCK], "tool_choice": "sometimes"},
            "must be 'none', 'auto', 'required' or",
            "tool_choice",
        ),
    ],
)
def test_bad_tools_are_a_400_naming_the_parameter(
    fields: dict[str, Any], says: str, param: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_chat_request(chat(**fields))
    assert says in caught.value.message
    assert caught.value.param == param


def test_tool_choice_and_parallel_calls_make_the_policy() -> None:
    assert policy().mode == "auto" and policy().many_calls
    assert policy("required", parallel=False).many_calls is False
    named = policy({"type": "function", "function": {"name": "now"}})
    assert named.mode == "named" and [t.name for t in named.callable_tools] == ["now"]
    assert not named.many_calls  # a named function is called once
    assert parse_chat_request(chat(tools=[CLOCK], tool_choice="none")).tool_policy is None
    # A function without parameters takes none: `{}`.
    assert named.callable_tools[0].parameters["additionalProperties"] is False


def test_messages_with_calls_and_results_are_read() -> None:
    request = parse_chat_request(
        chat(
            messages=[
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                        }
                    ],
                },
                {
                    "role": "tool",
                    "tool_call_id": "call_1",
                    "content": [{"type": "text", "text": "-3"}],
                },
            ]
        )
    )
    call = request.messages[1].tool_calls
    assert call is not None and call[0].function.arguments == '{"city": "Oslo"}'
    with pytest.raises(BadRequest, match="only assistant messages"):
        parse_chat_request(
            chat(
                messages=[
                    {
                        "role": "user",
                        "content": "x",
                        "tool_calls": [{"id": "a", "function": {"name": "f"}}],
                    }
                ]
            )
        )
    with pytest.raises(BadRequest, match="JSON object"):
        parse_chat_request(
            chat(
                messages=[
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "[1]"}}],
                    }
                ]
            )
        )


# --- the syntax of each template ---------------------------------------------------------


def test_each_template_gets_its_tool_syntax() -> None:
    assert tool_convention_for(TEMPLATES["qwen2"]).syntax is HERMES
    assert tool_convention_for(TEMPLATES["hermes-2"]).syntax is HERMES
    assert tool_convention_for(TEMPLATES["llama_3"]).syntax is LLAMA3_JSON
    for name in ("vicuna_v1", "llava_v1", "chatml"):
        assert tool_convention_for(TEMPLATES[name]).syntax is GENERIC_JSON
    plain_jinja = choose_template(LlmShape(49152, 30, 9), "{{ messages }}<|im_start|>")
    assert tool_convention_for(plain_jinja).syntax is GENERIC_JSON
    assert not tool_convention_for(plain_jinja).jinja_renders_tools
    qwen_like = choose_template(LlmShape(151936, 28, 12, "qwen2"), TOOL_JINJA)
    convention = tool_convention_for(qwen_like)
    assert convention.syntax is HERMES and convention.jinja_renders_tools


# --- the grammar -------------------------------------------------------------------------


class _ByteVocabulary:
    """One token per byte and an end-of-sequence token: every text has exactly one spelling."""

    eos_token_id = 256
    bos_token_id = None
    special_token_ids = (256,)
    tokens = (*(bytes([i]) for i in range(256)), b"<eos>")

    def __call__(self, data: bytes) -> list[int]:
        return list(data)


BYTES = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocabulary()))


def grammar_takes(grammar: str, answer: str) -> bool:
    """Whether the grammar lets the model write `answer` and then end."""
    compiled = llguidance.grammar_from("lark", grammar)
    matcher = llguidance.LLMatcher(BYTES, compiled, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(BYTES.tokenize_str(answer)) and matcher.is_accepting()


PARIS = ("get_weather", '{"city": "Paris", "unit": "celsius"}')
NOW = ("now", "{}")


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: s.name)
def test_grammars_are_valid_and_hold_the_calls(syntax: ToolCallSyntax) -> None:
    for choice in ("auto", "required", {"type": "function", "function": {"name": "now"}}):
        for parallel in (True, False):
            grammar = tool_call_grammar(syntax, policy(choice, parallel))
            compiled = llguidance.grammar_from("lark", grammar)
            assert llguidance.LLMatcher.validate_grammar(compiled) == ""
            # Nobody may call a function that is not offered, or break a call's schema.
            assert not grammar_takes(grammar, syntax.calls_text([("delete_all", "{}")]))
            assert not grammar_takes(grammar, syntax.calls_text([("get_weather", '{"days": 9}')]))
            assert not grammar_takes(grammar, syntax.calls_text([("get_weather", "{}")]))


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: s.name)
def test_required_calls_one_or_several_functions_and_never_writes_text(
    syntax: ToolCallSyntax,
) -> None:
    grammar = tool_call_grammar(syntax, policy("required"))
    assert grammar_takes(grammar, syntax.calls_text([PARIS]))
    assert grammar_takes(grammar, syntax.calls_text([PARIS, NOW]))
    assert not grammar_takes(grammar, "It is sunny.")
    single = tool_call_grammar(syntax, policy("required", parallel=False))
    assert grammar_takes(single, syntax.calls_text([NOW]))
    assert not grammar_takes(single, syntax.calls_text([PARIS, NOW]))


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: s.name)
def test_a_named_function_is_the_only_call(syntax: ToolCallSyntax) -> None:
    grammar = tool_call_grammar(syntax, policy({"type": "function", "function": {"name": "now"}}))
    assert grammar_takes(grammar, syntax.calls_text([NOW]))
    assert not grammar_takes(grammar, syntax.calls_text([PARIS]))
    assert not grammar_takes(grammar, "The time is noon.")


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: s.name)
def test_auto_lets_the_model_write_text_or_calls_that_parse(syntax: ToolCallSyntax) -> None:
    grammar = tool_call_grammar(syntax, policy("auto"))
    assert grammar_takes(grammar, "It is sunny in Paris today.\nEnjoy!")
    assert grammar_takes(grammar, "")
    assert grammar_takes(grammar, syntax.calls_text([PARIS, NOW]))
    # What starts as a call stays one.
    opening = syntax.opening
    assert not grammar_takes(grammar, opening + "not a call")


def test_hermes_auto_takes_text_before_the_calls_but_no_loose_marker() -> None:
    grammar = tool_call_grammar(HERMES, policy("auto"))
    assert grammar_takes(grammar, "Let me look that up.\n" + HERMES.calls_text([PARIS]))
    assert grammar_takes(grammar, "a <tool_ca and <tool_cal are only text")
    assert not grammar_takes(grammar, "text <tool_call> more text")
    assert not grammar_takes(grammar, HERMES.calls_text([PARIS]) + " and then text")


def test_json_syntaxes_in_auto_take_no_text_that_starts_like_a_call() -> None:
    for syntax in (LLAMA3_JSON, GENERIC_JSON):
        grammar = tool_call_grammar(syntax, policy("auto"))
        assert not grammar_takes(grammar, '{"answer": 42}')
        assert grammar_takes(grammar, 'The JSON is {"answer": 42}')


# --- reading calls -----------------------------------------------------------------------


def ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def stream_read(syntax: ToolCallSyntax, answer: str, step: int) -> Any:
    parser = ToolCallParser(syntax, {"get_weather", "now"}, ids())
    events = []
    for start in range(0, len(answer), step):
        events += parser.feed(answer[start : start + step])
    return collect(events + parser.finish())


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: s.name)
@pytest.mark.parametrize("step", [1, 2, 7, 1000])
def test_streamed_arguments_reassemble_to_the_calls_json(syntax: ToolCallSyntax, step: int) -> None:
    nested = ("get_weather", '{"city": "São \\"Paulo\\" {x}", "days": [1, {"a": "]}"}]}')
    answer = syntax.calls_text([nested, NOW])
    read = stream_read(syntax, answer, step)
    assert read == read_answer(answer, syntax, None, ids())  # streaming and not agree
    assert [c.name for c in read.calls] == ["get_weather", "now"]
    assert [c.id for c in read.calls] == ["call_0", "call_1"]
    assert json.loads(read.calls[0].arguments) == json.loads(nested[1])
    assert json.loads(read.calls[1].arguments) == {}
    assert read.content == ""


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: s.name)
def test_text_answers_are_text(syntax: ToolCallSyntax) -> None:
    for answer in ("Sunny, 21 degrees.", "", "a <b> c"):
        for step in (1, 3):
            assert stream_read(syntax, answer, step).content == answer
            assert not stream_read(syntax, answer, step).calls


def test_hermes_text_before_the_calls_is_content_and_partial_markers_are_held_back() -> None:
    answer = "Checking.\n" + HERMES.calls_text([PARIS])
    parser = ToolCallParser(HERMES, None, ids())
    first = parser.feed("Checking.\n<tool_")
    assert collect(first).content == "Checking.\n"  # `<tool_` waits
    rest = parser.feed(answer[len("Checking.\n<tool_") :]) + parser.finish()
    assert collect(rest).calls[0].name == "get_weather"
    assert collect(rest).content == ""
    # A held-back start that turns out to be text is released.
    parser = ToolCallParser(HERMES, None, ids())
    assert collect(parser.feed("x <tool_c") + parser.finish()).content == "x <tool_c"


def test_what_breaks_the_syntax_is_text_and_nothing_is_lost() -> None:
    # A worker that ignored the grammar: no call was opened, so all of it is text.
    for answer in (
        '{"tool_calls": 3}',
        "<tool_call>\nnot json",
        '{"tool_calls": [{"name": "rm", "arguments": {}}]}',
    ):
        syntax = HERMES if answer.startswith("<") else GENERIC_JSON
        read = read_answer(answer, syntax, {"get_weather"}, ids())
        assert read.content == answer and not read.calls
    # After a call: text from where it breaks.
    read = read_answer(HERMES.calls_text([NOW]) + "\nThat is all.", HERMES, None, ids())
    assert [c.name for c in read.calls] == ["now"] and read.content == "That is all."


def test_a_call_cut_by_max_tokens_keeps_what_it_has() -> None:
    read = read_answer('{"tool_calls": [{"name": "get_weather", "arguments": {"ci', GENERIC_JSON)
    assert read.calls[0].arguments == '{"ci' and read.content == ""
    read = read_answer('{"tool_calls": [{"name": "get_wea', GENERIC_JSON)
    assert read.content == '{"tool_calls": [{"name": "get_wea' and not read.calls


# --- the prompt --------------------------------------------------------------------------

HISTORY = (
    {"role": "user", "content": "Weather in Oslo? <tool_call> <|im_end|>"},
    {
        "role": "assistant",
        "content": "Looking.",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": -3}'},
)


def test_hermes_prompt_offers_the_tools_and_writes_calls_and_results() -> None:
    prompt = build_chat_prompt(TEMPLATES["qwen2"], messages(*HISTORY), True, None, policy())
    text = prompt.text
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(WEATHER) + "\n" in text
    assert "<tool_call>\n" + '{"name": "get_weather", "arguments": {"city": "Oslo"}}' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": -3}\n</tool_response><|im_end|>' in text
    # The client cannot write a marker of the tool syntax (nor of the template).
    assert f"<{MARKER_BREAK}tool_call>" in text and f"<{MARKER_BREAK}|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_llama3_prompt_puts_results_in_ipython_turns() -> None:
    prompt = build_chat_prompt(TEMPLATES["llama_3"], messages(*HISTORY), True, None, policy())
    assert '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>' in prompt.text
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": -3}<|eot_id|>' in prompt.text
    assert '{"name": "<function name>", "parameters": <arguments as a JSON object>}' in prompt.text


def test_generic_prompt_describes_the_json_convention() -> None:
    prompt = build_chat_prompt(
        TEMPLATES["vicuna_v1"], messages(*HISTORY), True, None, policy("required")
    )
    text = prompt.text
    assert (
        json.dumps(
            {
                "name": "now",
                "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
            }
        )
        in text
    )
    assert (
        '{"tool_calls": [{"name": "<function name>", "arguments": <arguments as a JSON object>}]}'
        in text
    )
    assert "Answer by calling one or more of the functions." in text
    call = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}'
    assert f"ASSISTANT: Looking.\n\n{call}</s>" in text
    assert (
        'USER: {"tool_result": {"name": "get_weather", "content": {"temp": -3}}} ASSISTANT:' in text
    )


def test_a_jinja_template_that_renders_tools_gets_them_with_calls_and_results() -> None:
    template = choose_template(LlmShape(151936, 28, 12, "qwen2"), TOOL_JINJA)
    renderer = JinjaChatTemplateRenderer()
    prompt = build_chat_prompt(template, messages(*HISTORY), True, renderer, policy())
    text = prompt.text
    assert "<tools>\n" + json.dumps(WEATHER) + "\n" in text  # keys in order, no escaping
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    )
    assert '<tool_response>\n{"temp": -3}\n</tool_response>' in text
    assert f"<{MARKER_BREAK}tool_call>" in text


def test_without_tools_the_prompt_is_as_before() -> None:
    plain = ({"role": "user", "content": "a <tool_call> b"},)
    prompt = build_chat_prompt(TEMPLATES["qwen2"], messages(*plain), True, None, None)
    assert "a <tool_call> b" in prompt.text and "# Tools" not in prompt.text
    # tool_choice "none": not offered, but earlier calls are still written.
    prompt = build_chat_prompt(TEMPLATES["qwen2"], messages(*HISTORY), True, None, None)
    assert "# Tools" not in prompt.text and "<tool_response>" in prompt.text


def test_a_result_must_answer_an_earlier_call() -> None:
    stray = (
        {"role": "user", "content": "x"},
        {"role": "tool", "tool_call_id": "c9", "content": "1"},
    )
    with pytest.raises(BadRequest, match="'c9' answers no tool call") as caught:
        build_chat_prompt(TEMPLATES["qwen2"], messages(*stray), True, None, policy())
    assert caught.value.param == "messages.1.tool_call_id"


# --- over HTTP, with the official client -------------------------------------------------


def openai_client(api: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="x", http_client=api.client, max_retries=0
    )


def pieces(text: str, size: int = 5) -> tuple[str, ...]:
    return tuple(text[i : i + size] for i in range(0, len(text), size))


def test_calls_in_a_whole_answer() -> None:
    answer = GENERIC_JSON.calls_text([PARIS, NOW])
    with fake_api(workers=FakeWorkerGateway(reply=pieces(answer))) as api:
        client = openai_client(api)
        completion = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER, CLOCK]
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls or []
        assert [c.function.name for c in calls] == ["get_weather", "now"]
        assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
        assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
        sent = api.workers.payloads[0]
        assert "get_weather" in sent["prompt"]
        assert sent["structured_outputs"] == {"grammar": tool_call_grammar(GENERIC_JSON, policy())}


def test_streamed_calls_reassemble_with_the_openai_client() -> None:
    template = TEMPLATES["qwen2"]
    answer = "Let me check.\n" + HERMES.calls_text([PARIS, NOW])
    workers = FakeWorkerGateway(reply=pieces(answer, 3), template=template)
    with fake_api(workers=workers) as api:
        stream = openai_client(api).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            tools=[WEATHER, CLOCK],
            tool_choice="auto",
            stream=True,
        )
        content, calls, reasons = "", {}, []
        for chunk in stream:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                if call.id:
                    assert entry["id"] is None  # one opening delta per call
                    entry["id"] = call.id
                    assert call.function and call.function.arguments == ""
                if call.function and call.function.name:
                    entry["name"] += call.function.name
                if call.function and call.function.arguments:
                    entry["arguments"] += call.function.arguments
            reasons.append(chunk.choices[0].finish_reason)
        assert content == "Let me check.\n"
        assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "now"]
        assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
        assert json.loads(calls[1]["arguments"]) == {}
        assert reasons[-1] == "tool_calls"


def test_a_text_answer_under_auto_is_plain_content() -> None:
    with fake_api() as api:
        body = chat_body(tools=[WEATHER], stream=True)
        events = sse_events(api.client.post("/v1/chat/completions", json=body).text)
        deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
        assert "".join(d.get("content", "") for d in deltas) == "Hello, world!"
        assert not any("tool_calls" in d for d in deltas)
        assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_tool_choice_none_offers_nothing_and_constrains_nothing() -> None:
    with fake_api() as api:
        body = chat_body(tools=[WEATHER], tool_choice="none")
        assert api.client.post("/v1/chat/completions", json=body).status_code == 200
        sent = api.workers.payloads[0]
        assert "structured_outputs" not in sent and "get_weather" not in sent["prompt"]


def test_every_choice_reads_its_own_calls() -> None:
    answer = LLAMA3_JSON.calls_text([NOW])
    workers = FakeWorkerGateway(reply=pieces(answer), template=TEMPLATES["llama_3"])
    with fake_api(workers=workers) as api:
        body = chat_body(tools=[CLOCK], tool_choice="required", n=2, stream=True)
        events = sse_events(api.client.post("/v1/chat/completions", json=body).text)
        opened = [
            (e["choices"][0]["index"], call["id"])
            for e in events[:-1]
            for call in e["choices"][0]["delta"].get("tool_calls", [])
            if "id" in call
        ]
        assert sorted(index for index, _ in opened) == [0, 1]
        assert len({call_id for _, call_id in opened}) == 2


def test_tools_with_a_picture() -> None:
    content = [
        {"type": "text", "text": "Which city is this? Get its weather."},
        {"type": "image_url", "image_url": {"url": PNG_DATA_URL}},
    ]
    answer = HERMES.calls_text([PARIS])
    workers = FakeWorkerGateway(reply=pieces(answer), template=TEMPLATES["qwen2"])
    with fake_api(workers=workers) as api:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "tools": [WEATHER],
            "tool_choice": "required",
        }
        reply = api.client.post("/v1/chat/completions", json=body).json()
        assert reply["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
        sent = api.workers.payloads[0]
        assert sent["images"] == [PNG_DATA_URL]
        assert "<|im_start|>user\n<image>\nWhich city is this?" in sent["prompt"]
        assert "<tools>" in sent["prompt"]


def test_the_renderer_speaks_hugging_faces_template_dialect() -> None:
    renderer = JinjaChatTemplateRenderer()
    tools = [{"type": "function", "function": {"name": "f", "description": "<b> & é"}}]
    source = "{{ tools | tojson }}|{{ tools is defined }}"
    assert (
        renderer.render(source, [], False, tools) == json.dumps(tools, ensure_ascii=False) + "|True"
    )
    assert renderer.render("{{ tools is defined }}", [], False) == "False"
    with pytest.raises(TemplateError, match="one call at a time"):
        renderer.render("{{ raise_exception('one call at a time') }}", [], False)


class GetWeather(pydantic.BaseModel):
    city: str
    days: int = 1


def test_the_clients_pydantic_tools_come_back_parsed_whole_and_streamed() -> None:
    answer = GENERIC_JSON.calls_text([("GetWeather", '{"city": "Oslo", "days": 2}')])
    with fake_api(workers=FakeWorkerGateway(reply=pieces(answer))) as api:
        client = openai_client(api)
        tool = openai.pydantic_function_tool(GetWeather)
        ask: Any = {"model": MODEL, "messages": [{"role": "user", "content": "Oslo?"}]}
        completion = client.chat.completions.parse(**ask, tools=[tool], tool_choice="required")
        call = (completion.choices[0].message.tool_calls or [])[0]
        assert call.function.parsed_arguments == GetWeather(city="Oslo", days=2)
        with client.chat.completions.stream(**ask, tools=[tool]) as stream:
            final = stream.get_final_completion()
        call = (final.choices[0].message.tool_calls or [])[0]
        assert call.function.parsed_arguments == GetWeather(city="Oslo", days=2)
