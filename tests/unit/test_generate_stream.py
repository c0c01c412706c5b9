"""The GenerateStream use case with fake adapters: text, echo, stops, errors, cancellation."""

from __future__ import annotations

import asyncio
import base64
import threading

import pytest
from fakes import (
    BAD_REGEX,
    FAKE_PNG_B64,
    FakeConstraintCompiler,
    FakeTextGenerator,
    FakeVisionEncoder,
)

from vilaserve.application.worker.engine.admission import Admission
from vilaserve.application.worker.generate_stream import GenerateStream, GenerationLimits
from vilaserve.domain.shared.errors import ErrorCode, InvalidImage, InvalidRequest
from vilaserve.domain.shared.generation import StreamChunk


def make(
    generator: FakeTextGenerator | None = None,
    vision: FakeVisionEncoder | None = None,
    interval: int = 1,
) -> GenerateStream:
    return GenerateStream(
        generator or FakeTextGenerator(),
        vision if vision is not None else FakeVisionEncoder(),
        GenerationLimits(stream_interval=interval),
    )


async def collect(use_case: GenerateStream, body: dict) -> list[StreamChunk]:
    return [chunk async for chunk in use_case.stream(use_case.prepare(body))]


def test_cumulative_text_with_echo_and_usage() -> None:
    chunks = asyncio.run(collect(make(), {"prompt": "USER: hi ASSISTANT:"}))
    assert [c.text for c in chunks] == [
        "USER: hi ASSISTANT:Hello",
        "USER: hi ASSISTANT:Hello,",
        "USER: hi ASSISTANT:Hello, world",
        "USER: hi ASSISTANT:Hello, world!",
    ]
    assert chunks[-1].finish_reason == "stop"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == 3


def test_echo_false_holds_only_the_answer() -> None:
    chunks = asyncio.run(collect(make(), {"prompt": "q", "echo": False}))
    assert chunks[-1].text == "Hello, world!"


def test_stream_interval_batches_chunks_but_keeps_the_final_text() -> None:
    chunks = asyncio.run(collect(make(interval=3), {"prompt": "q", "echo": False}))
    assert [c.text for c in chunks] == ["Hello, world", "Hello, world!"]


def test_length_finish_when_max_new_tokens_is_reached() -> None:
    chunks = asyncio.run(collect(make(), {"prompt": "q", "echo": False, "max_new_tokens": 2}))
    assert chunks[-1].text == "Hello,"
    assert chunks[-1].finish_reason == "length"


def test_stop_string_ends_the_stream_and_closes_the_generator() -> None:
    generator = FakeTextGenerator(reply=("Yes", " it", " is", "##", "#", " more", " text"))
    chunks = asyncio.run(collect(make(generator), {"prompt": "q", "echo": False, "stop": "###"}))
    assert chunks[-1].text == "Yes it is"
    assert chunks[-1].finish_reason == "stop"
    assert not any("#" in c.text for c in chunks)
    assert generator.closed == 1


def test_template_stop_strings_apply_without_being_asked() -> None:
    generator = FakeTextGenerator(reply=("A", "</s>", "B"))
    chunks = asyncio.run(collect(make(generator), {"prompt": "q", "echo": False}))
    assert chunks[-1].text == "A"
    assert chunks[-1].finish_reason == "stop"


def test_images_are_decoded_and_passed_in_order() -> None:
    vision = FakeVisionEncoder()
    second = base64.b64encode(b"\x89PNG second").decode()
    body = {
        "prompt": "<image> a <image> b",
        "images": [FAKE_PNG_B64, "data:image/png;base64," + second],
    }
    chunks = asyncio.run(collect(make(vision=vision), body))
    assert chunks[-1].error_code == 0
    assert vision.encoded == [(base64.b64decode(FAKE_PNG_B64), b"\x89PNG second")]
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 2 + 2 * 4
    )  # two words, two images


def test_fastchat_double_placeholders_count_once() -> None:
    generator = FakeTextGenerator()
    body = {"prompt": "USER: $$<image>$$<image>\nwhat? ASSISTANT:", "images": [FAKE_PNG_B64]}
    chunks = asyncio.run(collect(make(generator), body))
    assert chunks[-1].error_code == 0
    assert generator.calls[0][0] == "USER: <image>\nwhat? ASSISTANT:"


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ({"prompt": "<image> q"}, InvalidRequest, "1 '<image>' placeholders but 0 images"),
        ({"prompt": "q", "images": [FAKE_PNG_B64]}, InvalidRequest, "0 '<image>'"),
        ({"prompt": "<image>", "images": ["***"]}, InvalidImage, "image 1 is not valid base64"),
        ({"prompt": "<image>", "images": ["http://x/a.png"]}, InvalidImage, "URL"),
    ],
)
def test_bad_requests_are_refused_before_streaming(
    body: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        make().prepare(body)


def test_a_constraint_is_compiled_off_the_loop_and_handed_to_the_generator() -> None:
    generator, compiler = FakeTextGenerator(), FakeConstraintCompiler()
    use_case = GenerateStream(
        generator, FakeVisionEncoder(), GenerationLimits(), constraints=compiler
    )
    body = {"prompt": "q", "echo": False, "structured_outputs": {"choice": ["a", "b"]}}
    chunks = asyncio.run(collect(use_case, body))
    assert chunks[-1].text == "Hello, world!" and chunks[-1].finish_reason == "stop"
    [compiled] = generator.constraints
    assert compiled is not None and compiled.constraint.kind == "choice"
    assert compiler.threads and "MainThread" not in compiler.threads
    asyncio.run(collect(use_case, {"prompt": "q"}))
    assert generator.constraints[-1] is None  # unconstrained requests stay so


def test_a_constraint_that_does_not_compile_is_one_error_chunk_and_no_generation() -> None:
    generator = FakeTextGenerator()
    use_case = GenerateStream(
        generator, FakeVisionEncoder(), GenerationLimits(), constraints=FakeConstraintCompiler()
    )
    body = {"prompt": "q", "structured_outputs": {"regex": BAD_REGEX}}
    [chunk] = asyncio.run(collect(use_case, body))
    assert chunk.error_code == ErrorCode.VALIDATION_TYPE_ERROR
    assert "'structured_outputs.regex'" in chunk.text
    assert generator.calls == [] and generator.admission.queue_length == 0


def test_without_a_compiler_a_constrained_request_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidRequest, match="'structured_outputs'"):
        make().prepare({"prompt": "q", "structured_outputs": {"regex": "a"}})


def test_a_grammar_error_ending_keeps_the_text_and_says_why() -> None:
    generator = FakeTextGenerator(last_finish="grammar_error")
    use_case = GenerateStream(
        generator, FakeVisionEncoder(), GenerationLimits(), constraints=FakeConstraintCompiler()
    )
    # "!" could begin the stop string: held back, then given with the rest at the end.
    body = {"prompt": "q", "echo": False, "stop": "!!", "structured_outputs": {"regex": "a"}}
    chunks = asyncio.run(collect(use_case, body))
    assert chunks[-1] == StreamChunk(
        "Hello, world!", usage=chunks[-1].usage, finish_reason="grammar_error"
    )


def test_undecodable_image_becomes_an_error_chunk() -> None:
    body = {"prompt": "<image> q", "images": [base64.b64encode(b"not an image").decode()]}
    chunks = asyncio.run(collect(make(), body))
    assert len(chunks) == 1
    assert chunks[0].error_code == ErrorCode.VALIDATION_TYPE_ERROR
    assert "image 1 could not be decoded" in chunks[0].text


def test_context_overflow_is_reported_with_its_code() -> None:
    chunks = asyncio.run(collect(make(FakeTextGenerator(context=4)), {"prompt": "a b c d e"}))
    assert chunks == [StreamChunk(text=chunks[0].text, error_code=ErrorCode.CONTEXT_OVERFLOW)]
    assert "context holds 4" in chunks[0].text


def test_a_crash_mid_stream_ends_with_an_internal_error_chunk() -> None:
    chunks = asyncio.run(collect(make(FakeTextGenerator(fail_after=2)), {"prompt": "q"}))
    assert chunks[-1].error_code == ErrorCode.INTERNAL_ERROR
    assert "simulated kernel failure" in chunks[-1].text
    assert "NETWORK ERROR" not in chunks[-1].text


def test_a_request_leaves_the_queue_once_after_errors_and_cancellation() -> None:
    generator = FakeTextGenerator(delay_s=0.01, reply=tuple("abcdefgh"))
    use_case = make(generator)

    async def scenario() -> None:
        stream = use_case.stream(use_case.prepare({"prompt": "q"}))
        await stream.__anext__()
        assert (generator.admission.running, generator.admission.waiting) == (1, 0)
        await stream.aclose()  # the client went away
        assert generator.queue_length == 0
        assert generator.closed == 1
        generator.fail_after = 2
        chunks = await collect(use_case, {"prompt": "q"})
        assert chunks[-1].error_code == ErrorCode.INTERNAL_ERROR
        assert generator.queue_length == 0
        generator.fail_after = None
        chunks = await collect(use_case, {"prompt": " ".join(["w"] * 80)})  # refused prompt
        assert chunks[-1].error_code == ErrorCode.CONTEXT_OVERFLOW
        assert generator.queue_length == 0
        chunks = await collect(use_case, {"prompt": "<image> q", "images": ["bm90IGEgcG5n"]})
        assert chunks[-1].error_code == ErrorCode.VALIDATION_TYPE_ERROR  # a bad picture
        assert generator.queue_length == 0
        chunks = await collect(use_case, {"prompt": "q"})
        assert chunks[-1].finish_reason == "stop"
        assert (generator.admission.running, generator.admission.waiting) == (0, 0)

    asyncio.run(scenario())


def test_a_request_encoding_its_pictures_waits_in_the_queue() -> None:
    gate = threading.Event()
    generator = FakeTextGenerator()
    use_case = make(generator, FakeVisionEncoder(gate))

    async def scenario() -> None:
        body = {"prompt": "<image> q", "images": [FAKE_PNG_B64]}
        task = asyncio.create_task(collect(use_case, body))
        await asyncio.sleep(0.01)
        assert (generator.admission.running, generator.admission.waiting) == (0, 1)
        assert generator.queue_length == 1
        task.cancel()  # the client went away while its picture was being encoded
        with pytest.raises(asyncio.CancelledError):
            await task
        assert generator.queue_length == 0
        assert generator.calls == []  # it never reached the model

    asyncio.run(scenario())


def test_requests_beyond_the_queue_are_refused_at_once_naming_the_counts() -> None:
    generator = FakeTextGenerator(delay_s=0.02, admission=Admission(max_requests=2))
    use_case = make(generator)

    async def scenario() -> list[list[StreamChunk]]:
        tasks = [asyncio.create_task(collect(use_case, {"prompt": "q"})) for _ in range(3)]
        await asyncio.sleep(0.005)
        assert generator.queue_length == 2  # two in, the third refused
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    codes = sorted(r[-1].error_code for r in results)
    assert codes == [0, 0, ErrorCode.ENGINE_OVERLOADED]
    refused = next(r[-1] for r in results if r[-1].error_code)
    assert refused.text == (
        "the worker is busy: 2 requests running and 0 waiting (limit 2); retry later"
    )
    assert generator.queue_length == 0
