"""Domain rules: request parsing, stop strings, templates, model naming, error families."""

from __future__ import annotations

import pytest

from vilaserve.adapters.shared.jinja_chat_template import JinjaChatTemplateRenderer
from vilaserve.domain.api.errors import NoWorker, as_api_error
from vilaserve.domain.shared.conversation import (
    TEMPLATES,
    LlmShape,
    SeparatorStyle,
    choose_template,
)
from vilaserve.domain.shared.errors import (
    ControllerUnavailable,
    ErrorCode,
    InvalidRequest,
    ParamOutOfRange,
    Unavailable,
    WorkerUnavailable,
)
from vilaserve.domain.shared.generation import SamplingParams, parse_generation_request
from vilaserve.domain.worker.naming import derive_model_name
from vilaserve.domain.worker.stop_strings import StopStringMatcher


def test_defaults_follow_fastchat() -> None:
    request = parse_generation_request({"prompt": "hi"})
    assert request.echo is True
    assert request.params.temperature == 1.0
    assert request.params.top_p == 1.0
    assert request.params.max_new_tokens == 256
    assert request.params.top_k == -1


def test_max_new_tokens_is_capped_not_refused() -> None:
    request = parse_generation_request({"prompt": "hi", "max_new_tokens": 5000}, 1024)
    assert request.params.max_new_tokens == 1024


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.5, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -3, "top_k"),
        ("max_new_tokens", 0, "max_new_tokens"),
        ("seed", 2**70, "seed"),
    ],
)
def test_out_of_range_parameters_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ParamOutOfRange, match=message) as info:
        parse_generation_request({"prompt": "hi", field: value})
    assert info.value.code == ErrorCode.PARAM_OUT_OF_RANGE


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2], "JSON object"),
        ({}, "'prompt' is required"),
        ({"prompt": 3}, "'prompt' must be a string"),
        ({"prompt": "x", "temperature": "hot"}, "'temperature' must be a number"),
        ({"prompt": "x", "images": [1]}, "'images'"),
        ({"prompt": "x", "stop_token_ids": ["a"]}, "'stop_token_ids'"),
        ({"prompt": "x", "echo": "yes"}, "'echo'"),
    ],
)
def test_malformed_requests_are_named(body: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_generation_request(body)


def test_greedy_below_threshold_and_top_k_zero_disables() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=9e-6).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy
    assert parse_generation_request({"prompt": "x", "top_k": 0}).params.top_k == -1


def test_stop_string_split_across_deltas_is_held_back() -> None:
    matcher = StopStringMatcher(["</s>", "###"])
    emitted = [matcher.push(d) for d in ["Hello <", "/", "s> tail"]]
    assert [e.emit for e in emitted] == ["Hello ", "", ""]
    assert emitted[-1].stopped


def test_partial_stop_prefix_is_released_when_it_turns_out_not_to_stop() -> None:
    matcher = StopStringMatcher(["</s>"])
    assert matcher.push("a </").emit == "a "
    assert matcher.push("b>").emit == "</b>"
    assert matcher.push("x <").emit == "x "
    assert matcher.flush() == "<"


def test_templates_render_as_vila_does() -> None:
    vicuna = TEMPLATES["vicuna_v1"]
    prompt = vicuna.render([("USER", "<image>\nWhat is it?"), ("ASSISTANT", None)])
    assert prompt.endswith(" USER: <image>\nWhat is it? ASSISTANT:")
    assert prompt.startswith("A chat between a curious user")
    hermes = TEMPLATES["hermes-2"].render(
        [("<|im_start|>user\n", "<image>\nq"), ("<|im_start|>assistant\n", None)]
    )
    assert hermes == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nq"
        "<|im_end|><|im_start|>assistant\n"
    )
    llama3 = TEMPLATES["llama_3"].render([("user", "q"), ("assistant", None)])
    assert llama3.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert llama3.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_multi_turn_vicuna_closes_assistant_turns_with_eos() -> None:
    prompt = TEMPLATES["vicuna_v1"].render(
        [("USER", "a"), ("ASSISTANT", "b"), ("USER", "c"), ("ASSISTANT", None)]
    )
    assert prompt.endswith("USER: a ASSISTANT: b</s>USER: c ASSISTANT:")


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (LlmShape(32000, 32, 20), "vicuna_v1"),
        (LlmShape(128256, 32, 32), "llama_3"),
        (LlmShape(64000, 60, 56), "hermes-2"),
    ],
)
def test_template_heuristic(shape: LlmShape, expected: str) -> None:
    assert choose_template(shape, None).name == expected


def test_template_override_and_tokenizer_template() -> None:
    shape = LlmShape(49152, 30, 9)
    assert choose_template(shape, None, "llama_3").name == "llama_3"
    jinja = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    template = choose_template(shape, jinja)
    assert template.name == "tokenizer"
    turns = [(template.roles[0], "hi"), (template.roles[1], None)]
    rendered = template.render(turns, "", JinjaChatTemplateRenderer())
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="needs a ChatTemplateRenderer"):
        template.render(turns, "")  # the domain holds no template engine
    with pytest.raises(ValueError, match="unknown conversation template 'nope'"):
        choose_template(shape, None, "nope")


def test_fastchat_conv_dict_has_the_fields_fastchat_reads() -> None:
    conv = TEMPLATES["vicuna_v1"].with_stop_token_ids([2]).to_fastchat_dict()
    for key in (
        "name",
        "system_template",
        "system_message",
        "roles",
        "messages",
        "offset",
        "sep_style",
        "sep",
        "sep2",
        "stop_str",
        "stop_token_ids",
    ):
        assert key in conv
    assert conv["sep_style"] == int(SeparatorStyle.ADD_COLON_TWO) == 2
    assert conv["stop_token_ids"] == [2]


@pytest.mark.parametrize(
    ("path", "precision", "expected"),
    [
        ("/models/VILA1.5-3b", "W16A16", "VILA1.5-3b"),
        ("/models/VILA1.5-3b/", "W4A16", "VILA1.5-3b-4bit-AWQ"),
        ("/runs/vila-ft/checkpoint-1200", "W16A16", "vila-ft_checkpoint-1200"),
    ],
)
def test_model_name_derivation(path: str, precision: str, expected: str) -> None:
    assert derive_model_name(path, precision) == expected
    assert derive_model_name(path, precision, "custom") == "custom"


@pytest.mark.parametrize(
    ("error", "service", "code"),
    [
        (WorkerUnavailable("http://w:21002", "connection refused"), "worker", 50006),
        (ControllerUnavailable("http://c:21001", "connection refused"), "controller", 50005),
    ],
)
def test_one_unavailable_family_names_service_address_and_cause(
    error: Unavailable, service: str, code: int
) -> None:
    assert isinstance(error, Unavailable)
    assert error.message == f"the {service} at {error.address} failed: connection refused"
    assert int(error.code) == code
    answer = as_api_error(error)  # what the OpenAI API answers for it
    assert isinstance(answer, NoWorker)
    assert (answer.status, int(answer.code), answer.message) == (503, code, error.message)


def test_a_timeout_says_so() -> None:
    error = WorkerUnavailable("http://w:21002", "/worker_get_status", timed_out=True)
    assert error.timed_out
    assert (
        error.message == "the worker at http://w:21002 did not answer in time: /worker_get_status"
    )
