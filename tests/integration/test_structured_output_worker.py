"""Structured output on the real worker: llguidance over the model's own tokenizer, masks in the
engine's steps, answers through the worker's use case (and its HTTP protocol once).

On the tiny checkpoints the model is random: every answer is valid only because of the
constraint. The demo model (SmolLM2's tokenizer) is right only because of it too, at
temperatures up to 1.2.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import torch
from engine_wiring import engine_generator
from servers import start_worker

from vilaserve.adapters.offline.checkpoints.tiny_vila import make_png_b64
from vilaserve.adapters.worker.torch_vila.constraints import (
    CompilerBuiltInBackground,
    LlguidanceConstraintCompiler,
)
from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions
from vilaserve.adapters.worker.torch_vila.token_guide import TokenGuide
from vilaserve.adapters.worker.torch_vila.token_masks import (
    TokenMasks,
    forbidden_tokens,
    penalties,
)
from vilaserve.application.worker.generate_stream import GenerateStream, GenerationLimits
from vilaserve.domain.shared.errors import ErrorCode, InvalidRequest
from vilaserve.domain.shared.generation import OutputConstraint, StreamChunk

# Every kind of JSON schema rule the issue names; strings bounded so that a random model's
# answer ends well within the token budget (a character can take several byte tokens).
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 6},
            "minItems": 1,
            "maxItems": 3,
        },
        "manager": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]},
    },
    "required": ["name", "age", "role", "address", "tags", "manager"],
    "additionalProperties": False,
}
INVENTORY: dict[str, Any] = {
    "type": "array",
    "minItems": 2,
    "maxItems": 2,
    "items": {
        "type": "object",
        "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "in_stock": {"type": "boolean"},
            "count": {"type": "integer", "minimum": 0, "maximum": 500},
        },
        "required": ["sku", "in_stock", "count"],
        "additionalProperties": False,
    },
}
MAX_NEW_TOKENS = 320
SAMPLINGS = [(0.0, None), (0.7, 1), (0.7, 2), (1.2, 1), (1.2, 2), (1.2, 3)]
ASK = "USER: Describe one person as JSON. ASSISTANT:"
# After "a", a lexeme whose language is empty: no token can ever continue the answer.
DEAD_END = 'start: "a" B\nB: /[a-z]+/ & /[0-9]+/'


@dataclass
class Served:
    runtime: VilaRuntime
    compiler: LlguidanceConstraintCompiler

    def answer(self, bodies: list[dict[str, Any]], max_num_seqs: int = 8) -> list[StreamChunk]:
        """The final chunk of each body's stream, all sent at once to one engine."""
        generator = engine_generator(self.runtime, max_num_seqs=max_num_seqs)
        use_case = GenerateStream(
            generator, self.runtime.vision_encoder, GenerationLimits(), constraints=self.compiler
        )

        async def one(body: dict[str, Any]) -> StreamChunk:
            return [c async for c in use_case.stream(use_case.prepare(body))][-1]

        async def all_of_them() -> list[StreamChunk]:
            try:
                return list(await asyncio.gather(*(one(b) for b in bodies)))
            finally:
                await generator.close()

        return asyncio.run(all_of_them())


def serve(options: VilaRuntimeOptions) -> Iterator[Served]:
    runtime = VilaRuntime.load(options)
    runner = runtime.model_runner
    compiler = LlguidanceConstraintCompiler(runner.tokenizer, sorted(runner.stop_token_ids))
    yield Served(runtime, compiler)
    runtime.executor.shutdown()


@pytest.fixture(scope="module")
def tiny(tiny_vila_siglip: Path) -> Iterator[Served]:
    yield from serve(
        VilaRuntimeOptions(model_path=str(tiny_vila_siglip), dtype="float32", kv_slots=8)
    )


@pytest.fixture(scope="module")
def demo(demo_model: Path) -> Iterator[Served]:
    yield from serve(VilaRuntimeOptions(model_path=str(demo_model), precision="W4A16", kv_slots=8))


@pytest.fixture(params=["tiny", pytest.param("demo", marks=pytest.mark.demo)])
def served(request: pytest.FixtureRequest) -> Served:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def body(constraint: dict[str, Any], temperature: float = 0.0, seed: int | None = None) -> dict:
    return {
        "prompt": ASK,
        "echo": False,
        "temperature": temperature,
        "seed": seed,
        "max_new_tokens": MAX_NEW_TOKENS,
        "structured_outputs": constraint,
    }


def finished(chunk: StreamChunk) -> str:
    assert chunk.error_code == 0, chunk.text
    assert chunk.finish_reason == "stop", (chunk.finish_reason, chunk.text)
    return chunk.text


@pytest.mark.parametrize("schema", [PERSON, INVENTORY], ids=["person", "inventory"])
def test_every_answer_to_a_schema_is_valid_at_every_temperature(
    served: Served, schema: dict[str, Any]
) -> None:
    chunks = served.answer([body({"json": schema}, t, s) for t, s in SAMPLINGS])
    for chunk in chunks:
        jsonschema.validate(json.loads(finished(chunk)), schema)
    if schema is PERSON:  # keys in the schema's order, laid out as json.dumps writes them
        answer = json.loads(chunks[0].text)
        assert list(answer) == list(PERSON["properties"])
        assert chunks[0].text == json.dumps(answer, ensure_ascii=False)


def test_json_object_regex_and_choice_answers_match(served: Served) -> None:
    choices = ["circle", "square", "a red triangle"]
    regex = "[A-Z]{2}-[0-9]{3}( ok)?"
    bounded = [{"regex": regex}, {"choice": choices}]
    bodies = [body(c, t, s) for c in bounded for t, s in SAMPLINGS[::2]]
    texts = [finished(chunk) for chunk in served.answer(bodies)]
    assert all(re.fullmatch(regex, text) for text in texts[:3]), texts[:3]
    assert all(text in choices for text in texts[3:]), texts[3:]
    # Any object: nothing bounds its strings, so a model may spend its whole budget in one;
    # whatever ends is an object, and whatever is cut off is the start of one.
    ask = "USER: Give a JSON object with a name and an age. ASSISTANT:"
    objects = [{**body({"json_object": True}, t, s), "prompt": ask} for t, s in SAMPLINGS]
    ended = 0
    for chunk in served.answer(objects):
        if chunk.finish_reason == "length":
            assert chunk.text.startswith("{"), chunk.text
            continue
        assert isinstance(json.loads(finished(chunk)), dict)
        ended += 1
    assert ended >= len(objects) // 2


def test_a_picture_and_a_schema(served: Served) -> None:
    asked = {
        **body({"json": PERSON}, 0.7, 5),
        "prompt": "USER: <image>\nWho is in the picture? Answer in JSON. ASSISTANT:",
        "images": [make_png_b64(64, 48, (30, 160, 90))],
    }
    [chunk] = served.answer([asked])
    jsonschema.validate(json.loads(finished(chunk)), PERSON)


def test_greedy_and_seeded_answers_are_the_same_every_time(served: Served) -> None:
    greedy, seeded = body({"json": PERSON}), body({"json": INVENTORY}, 1.2, 7)
    first = [chunk.text for chunk in served.answer([greedy, seeded], max_num_seqs=1)]
    again = [chunk.text for chunk in served.answer([greedy, seeded], max_num_seqs=1)]
    assert first == again
    # The second one finds the first one's prompt in the prefix cache; the constraint's
    # state is its own, not the cache row's.
    twice = [chunk.text for chunk in served.answer([greedy, greedy], max_num_seqs=1)]
    assert twice == [first[0], first[0]]


# Batched as alone, to the token: on the float32 checkpoint, whose rows compute alike in a
# batch of any size (the 4-bit demo's GEMMs may round a row differently with more rows).
def test_constrained_and_free_requests_batched_answer_as_each_does_alone(tiny: Served) -> None:
    free = [
        {"prompt": "USER: hello there ASSISTANT:", "echo": False, "temperature": 0},
        {"prompt": "USER: tell me more ASSISTANT:", "echo": False, "temperature": 0.9, "seed": 5},
    ]
    free = [{**b, "max_new_tokens": 24} for b in free]
    constrained = [body({"json": PERSON}), body({"json": INVENTORY}, 1.2, 7)]
    constrained += [body({"regex": "[a-z]{4}"}, 1.0, 3), body({"choice": ["x", "y"]}, 0.9, 4)]
    everyone = [*constrained, *free]
    alone = [tiny.answer([b], max_num_seqs=1)[0] for b in everyone]
    mixed = tiny.answer([everyone[i] for i in (0, 4, 1, 2, 5, 3)])
    assert [mixed[i] for i in (0, 2, 3, 5, 1, 4)] == alone
    jsonschema.validate(json.loads(finished(alone[0])), PERSON)
    jsonschema.validate(json.loads(finished(alone[1])), INVENTORY)


def test_a_grammar_that_dead_ends_ends_the_answer_with_grammar_error(served: Served) -> None:
    dead, fine = served.answer(
        [body({"grammar": DEAD_END}), body({"regex": "[a-z]{3}"}, 1.0, 2)], max_num_seqs=2
    )
    assert (dead.text, dead.finish_reason, dead.error_code) == ("a", "grammar_error", 0)
    assert dead.usage is not None and dead.usage.completion_tokens == 2
    assert re.fullmatch("[a-z]{3}", finished(fine))


def test_the_same_constraint_compiles_once(tiny: Served) -> None:
    constraint = OutputConstraint("regex", "[0-9]{4}-cached")
    first = tiny.compiler.compile(constraint)
    assert tiny.compiler.compile(OutputConstraint("regex", "[0-9]{4}-cached")) is first
    small = LlguidanceConstraintCompiler(tiny.runtime.model_runner.tokenizer, [2], cache_size=1)
    kept = small.compile(constraint)
    small.compile(OutputConstraint("regex", "b"))
    assert small.compile(constraint) is not kept  # evicted by the newer one


def test_the_background_compiler_serves_once_built_and_names_an_unreadable_tokenizer(
    tiny: Served,
) -> None:
    # The worker's compiler converts its tokenizer on a thread; a request waits for it.
    built = CompilerBuiltInBackground(tiny.runtime.model_runner.tokenizer, [2])
    compiled = built.compile(OutputConstraint("regex", "[0-9]{3}"))
    assert compiled.constraint.spec == "[0-9]{3}"
    unreadable = CompilerBuiltInBackground(object(), [2])  # not a tokenizer at all
    with pytest.raises(InvalidRequest, match="tokenizer could not be read"):
        unreadable.compile(OutputConstraint("regex", "[0-9]{3}"))


class _Matcher:
    """Stands in for llguidance's matcher: allows `allowed` tokens (none: a dead end)."""

    def __init__(self, allowed: list[int]) -> None:
        self.allowed = allowed
        self.consumed: list[int] = []

    def unsafe_compute_mask_ptr(self, pointer: int, size: int) -> None:
        words = (ctypes.c_int32 * (size // 4)).from_address(pointer)
        for index in range(size // 4):
            words[index] = 0
        for token in self.allowed:
            words[token // 32] |= 1 << (token % 32)

    def is_error(self) -> bool:
        return False

    def consume_token(self, token: int) -> bool:
        self.consumed.append(token)
        return token in self.allowed


def test_masks_allow_only_the_guides_tokens_never_those_beyond_the_tokenizer() -> None:
    vocab, width = 40, 70  # logits wider than the tokenizer (padded embeddings)
    masks = TokenMasks(max_rows=4, vocab_size=vocab, device=torch.device("cpu"))
    logits = torch.zeros(3, width)
    logits[:, 60] = 100.0  # the favourite of every row: an id the tokenizer does not have
    logits[:, 5] = 50.0
    guides = [TokenGuide(_Matcher([5, 33]), vocab), TokenGuide(_Matcher([33]), vocab)]  # type: ignore[arg-type]
    masks.apply(logits, [(0, guides[0]), (2, guides[1])])
    assert logits.argmax(-1).tolist() == [5, 60, 33]  # row 1 is free
    assert torch.isinf(logits[0]).sum() == width - 2 and not torch.isinf(logits[1]).any()


def test_a_guide_that_allows_nothing_fails_and_its_row_is_sampled_unmasked() -> None:
    masks = TokenMasks(max_rows=2, vocab_size=64, device=torch.device("cpu"))
    logits = torch.randn(2, 64)
    before = logits.clone()
    dead, alive = TokenGuide(_Matcher([]), 64), TokenGuide(_Matcher([7]), 64)  # type: ignore[arg-type]
    masks.apply(logits, [(0, dead), (1, alive)])
    assert dead.failed and not alive.failed
    assert torch.equal(logits[0], before[0])  # no -inf row: sampling never sees NaN
    assert logits[1].argmax() == 7


@pytest.mark.parametrize("width", [40, 64, 70])
def test_the_gpu_unpacking_forbids_what_the_cpu_penalties_do(width: int) -> None:
    """The two ways to apply a mask agree (the device's arithmetic, run here on the CPU)."""
    words = torch.randint(-(2**31), 2**31 - 1, (3, 2), dtype=torch.int32)
    on_cpu = penalties(words.numpy(), width, torch.float32) == float("-inf")
    shifts = torch.arange(32, dtype=torch.int32)
    assert torch.equal(forbidden_tokens(words, width, shifts), on_cpu)


def test_the_worker_refuses_bad_constraints_with_400_and_serves_good_ones(
    tiny_vila_siglip: Path,
) -> None:
    refused = {
        "regex": ("(", "unclosed group"),
        "json": ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        "grammar": ("start: foo", 'unknown name: "foo"'),
    }
    with start_worker(tiny_vila_siglip) as worker:
        url = worker.url + "/worker_generate_stream"
        for kind, (spec, message) in refused.items():
            response = httpx.post(url, json=body({kind: spec}), timeout=60)
            assert response.status_code == 400, response.content
            [frame] = [json.loads(f) for f in response.content.split(b"\0") if f]
            assert frame["error_code"] == ErrorCode.VALIDATION_TYPE_ERROR
            assert f"'structured_outputs.{kind}' cannot be used" in frame["text"]
            assert message in frame["text"]
        good = httpx.post(url, json=body({"json": INVENTORY}, 1.2, 9), timeout=60)
        assert good.status_code == 200
        last = [json.loads(f) for f in good.content.split(b"\0") if f][-1]
        assert last["finish_reason"] == "stop"
        jsonschema.validate(json.loads(last["text"]), INVENTORY)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_constrained_answers_on_cuda(tiny_vila_siglip: Path) -> None:
    options = VilaRuntimeOptions(model_path=str(tiny_vila_siglip), device="cuda", kv_slots=8)
    for served in serve(options):
        bodies = [body({"json": PERSON}, t, s) for t, s in SAMPLINGS]
        bodies.append({**body({}, 0.0), "structured_outputs": None, "max_new_tokens": 8})
        *constrained, free = served.answer(bodies)
        for chunk in constrained:
            jsonschema.validate(json.loads(finished(chunk)), PERSON)
        assert free.error_code == 0
