"""Where a request's time to first token goes (issue 25): each part measured where it happens,
logged once per request as "first token" and observed for /metrics.

The fakes report known seconds: the vision encoder its images' decode, tower and projector,
the model runner the model work and the sampling of every step with prompt chunks.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from engine_fakes import FakeModelRunner
from fakes import FAKE_PNG_B64, FakeVisionEncoder
from fastapi.testclient import TestClient

from vilaserve.application.worker.engine.engine import Engine
from vilaserve.application.worker.engine.scheduler import SchedulerConfig
from vilaserve.application.worker.engine.text_generator import EngineTextGenerator
from vilaserve.application.worker.generate_stream import GenerateStream, GenerationLimits
from vilaserve.domain.shared.generation import StreamChunk
from vilaserve.domain.worker.batch import StepTiming
from vilaserve.domain.worker.first_token import FIRST_TOKEN_PARTS, FirstTokenParts, ImageTimings

IMAGES = ImageTimings(decode_s=0.5, tower_s=1.25, projector_s=0.75)
STEP = StepTiming(forward_s=0.25, sample_s=0.125)
LOGGER = "vilaserve.application.worker.generate_stream"


class RecordingObserver:
    def __init__(self) -> None:
        self.parts: list[FirstTokenParts] = []

    def first_token_parts(self, parts: FirstTokenParts) -> None:
        self.parts.append(parts)


def engine_stream(
    runner: FakeModelRunner, observer: RecordingObserver, **config: int
) -> tuple[GenerateStream, EngineTextGenerator]:
    generator = EngineTextGenerator(Engine(runner, SchedulerConfig(**config)))
    stream = GenerateStream(
        generator, FakeVisionEncoder(timings=IMAGES), GenerationLimits(), observer
    )
    return stream, generator


async def run(stream: GenerateStream, body: dict) -> list[StreamChunk]:
    return [chunk async for chunk in stream.stream(stream.prepare(body))]


def first_token_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.getMessage() == "first token"]


def test_an_image_request_reports_each_part_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    observer = RecordingObserver()
    runner = FakeModelRunner(step_timing=STEP)
    body = {
        "prompt": "USER: <image>\nwhat is it? ASSISTANT:",
        "images": [FAKE_PNG_B64],
        "temperature": 0,
        "max_new_tokens": 6,
        "request_id": "req-image",
    }

    async def scenario() -> list[StreamChunk]:
        stream, generator = engine_stream(runner, observer)
        try:
            return await run(stream, body)
        finally:
            await generator.close()

    chunks = asyncio.run(scenario())
    assert chunks[-1].error_code == 0
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 1
    # One report for the request, however many tokens it produced.
    assert len(observer.parts) == 1
    parts = observer.parts[0]
    assert (parts.image_decode_s, parts.vision_tower_s, parts.projector_s) == (0.5, 1.25, 0.75)
    # The whole prompt fits one step: one step's model work, then its sampling.
    assert (parts.prefill_s, parts.first_sample_s) == (0.25, 0.125)
    assert 0.0 <= parts.queue_s < 5.0
    (record,) = first_token_records(caplog)
    assert record.request_id == "req-image"  # type: ignore[attr-defined]
    logged = {name: getattr(record, f"{name}_s") for name in FIRST_TOKEN_PARTS}
    assert logged == {name: round(s, 3) for name, s in parts.by_name().items()}
    assert logged["vision_tower"] == 1.25 and logged["first_sample"] == 0.125
    assert 0.0 <= record.ttft_s < 5.0  # type: ignore[attr-defined]


def test_a_chunked_text_prompt_sums_its_steps_and_has_no_image_parts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    observer = RecordingObserver()
    runner = FakeModelRunner(step_timing=STEP)
    prompt = " ".join(f"w{i}" for i in range(20))
    body = {"prompt": prompt, "temperature": 0, "max_new_tokens": 3}

    async def scenario() -> None:
        # 8 positions per step and no short-prompt exception: chunks of 8, 8 and 4.
        stream, generator = engine_stream(
            runner, observer, max_num_seqs=1, max_num_batched_tokens=8, short_prompt=0
        )
        try:
            await run(stream, body)
        finally:
            await generator.close()

    asyncio.run(scenario())
    prefill_steps = [b for b in runner.batches if b.prefills]
    assert len(prefill_steps) == 3
    (parts,) = observer.parts
    assert (parts.image_decode_s, parts.vision_tower_s, parts.projector_s) == (0.0, 0.0, 0.0)
    assert parts.prefill_s == pytest.approx(3 * STEP.forward_s)
    assert parts.first_sample_s == STEP.sample_s  # the last chunk's step only
    (record,) = first_token_records(caplog)
    assert record.image_decode_s == 0.0 and record.prefill_s == 0.75  # type: ignore[attr-defined]


def test_a_runner_that_does_not_split_its_steps_gives_them_to_prefill() -> None:
    observer = RecordingObserver()

    async def scenario() -> None:
        stream, generator = engine_stream(FakeModelRunner(), observer)
        try:
            await run(stream, {"prompt": "a b c", "temperature": 0, "max_new_tokens": 2})
        finally:
            await generator.close()

    asyncio.run(scenario())
    (parts,) = observer.parts
    assert parts.prefill_s > 0.0 and parts.first_sample_s == 0.0


def test_the_wait_for_a_turn_is_the_queue_part() -> None:
    observer = RecordingObserver()
    # One request served at a time; each engine step takes 20 ms on the fake's clock.
    runner = FakeModelRunner(delay_s=0.02, step_timing=STEP)
    body = {"prompt": "a b c", "temperature": 0, "max_new_tokens": 4}

    async def scenario() -> None:
        stream, generator = engine_stream(runner, observer, max_in_service=1)
        try:
            await asyncio.gather(run(stream, dict(body)), run(stream, dict(body)))
        finally:
            await generator.close()

    asyncio.run(scenario())
    assert len(observer.parts) == 2  # once per request
    first, second = sorted(observer.parts, key=lambda p: p.queue_s)
    # The second waited for the whole first request: 4 steps of at least 20 ms.
    assert second.queue_s >= 0.06 > first.queue_s


@pytest.fixture
def vision() -> FakeVisionEncoder:  # the worker app's encoder (conftest.py), with timings
    return FakeVisionEncoder(timings=IMAGES)


def test_metrics_show_each_part_after_a_request(client: TestClient) -> None:
    body = {"prompt": "USER: <image>\nwhat? ASSISTANT:", "images": [FAKE_PNG_B64]}
    assert client.post("/worker_generate", json=body).json()["error_code"] == 0
    text = client.get("/metrics").text
    for part in FIRST_TOKEN_PARTS:
        assert f'vilaserve:first_token_part_seconds_count{{part="{part}"}} 1.0' in text, part
    assert 'vilaserve:first_token_part_seconds_sum{part="vision_tower"} 1.25' in text
