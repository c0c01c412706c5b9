"""The engine's scheduling, off-GPU: a fake runner that checks its KV books (engine_fakes.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
from engine_fakes import STOP, FakeModelRunner, FakePrompt
from fakes import FakeCompiledConstraint

from vilaserve.application.worker.engine.chunk_control import ChunkController
from vilaserve.application.worker.engine.engine import Engine
from vilaserve.application.worker.engine.scheduler import SchedulerConfig
from vilaserve.application.worker.engine.sequence import SequenceStatus
from vilaserve.application.worker.engine.text_generator import EngineTextGenerator
from vilaserve.domain.shared.errors import OutOfDeviceMemory, ServingError
from vilaserve.domain.shared.generation import GenerationStep, OutputConstraint, SamplingParams
from vilaserve.domain.worker.batch import ModelBatch
from vilaserve.domain.worker.ports import CompiledConstraint, ImageFeatures

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


def make(runner: FakeModelRunner, **config: int) -> EngineTextGenerator:
    return EngineTextGenerator(Engine(runner, SchedulerConfig(**config)))


def prompt(n: int, tag: str = "p") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


async def collect(steps: AsyncIterator[GenerationStep]) -> tuple[str, str | None, int]:
    text, finish, produced = "", None, 0
    async for step in steps:
        text += step.text
        finish, produced = step.finish_reason, step.completion_tokens
    return text, finish, produced


async def alone(text: str, params: SamplingParams = GREEDY) -> str:
    generator = make(FakeModelRunner(cache_rows=1), max_num_seqs=1)
    try:
        return (await collect(generator.generate(text, None, params)))[0]
    finally:
        await generator.close()


def test_a_batch_gives_each_request_what_it_gets_alone() -> None:
    prompts = [prompt(3 + 7 * i, f"r{i}-") for i in range(8)]

    async def scenario() -> None:
        expected = [await alone(p) for p in prompts]
        runner = FakeModelRunner(cache_rows=8, delay_s=0.0005)
        generator = make(runner, max_num_seqs=8, prefill_chunk_while_decoding=4)

        async def late(i: int) -> str:
            await asyncio.sleep(0.001 * i)  # requests join while others decode
            return (await collect(generator.generate(prompts[i], None, GREEDY)))[0]

        got = await asyncio.gather(*(late(i) for i in range(8)))
        await generator.close()
        assert got == expected
        assert max(len(b.decodes) for b in runner.batches) > 1  # they really shared steps

    asyncio.run(scenario())


def test_seeded_sampling_is_the_same_alone_or_batched() -> None:
    params = SamplingParams(temperature=0.8, seed=1234, max_new_tokens=10)

    async def scenario() -> None:
        expected = await alone(prompt(5), params)
        generator = make(FakeModelRunner(cache_rows=4), max_num_seqs=4)
        results = await asyncio.gather(
            collect(generator.generate(prompt(5), None, params)),
            collect(generator.generate(prompt(9, "x"), None, GREEDY)),
        )
        await generator.close()
        assert results[0][0] == expected

    asyncio.run(scenario())


def test_every_step_decodes_all_running_sequences_together() -> None:
    async def scenario() -> None:
        # Prompts are tokenized on a thread: the first step waits long enough for all four.
        runner = FakeModelRunner(cache_rows=4, delay_s=0.05)
        generator = make(runner, max_num_seqs=4)
        await asyncio.gather(
            *(collect(generator.generate(prompt(4), None, GREEDY)) for _ in range(4))
        )
        await generator.close()
        # 4 prompts prefilled in the first step, then 11 steps of 4 decodes each
        assert [len(b.prefills) for b in runner.batches][:1] == [4]
        assert all(len(b.decodes) == 4 for b in runner.batches[1:])
        assert len(runner.batches) == 12

    asyncio.run(scenario())


def test_a_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding() -> None:
    async def scenario() -> None:
        runner = FakeModelRunner(cache_rows=4, delay_s=0.001)
        generator = make(runner, max_num_seqs=4, prefill_chunk_while_decoding=16, short_prompt=8)
        running = [
            asyncio.ensure_future(
                collect(
                    generator.generate(
                        prompt(3, f"s{i}"), None, SamplingParams(temperature=0, max_new_tokens=200)
                    )
                )
            )
            for i in range(3)
        ]
        while not runner.batches or not runner.batches[-1].decodes:
            await asyncio.sleep(0.001)
        long_text, finish, _ = await collect(generator.generate(prompt(200, "L"), None, GREEDY))
        await asyncio.gather(*running)
        await generator.close()
        assert finish == "length" and long_text
        chunked = [b for b in runner.batches if any(c.prompt.words[0] == "L0" for c in b.prefills)]
        assert len(chunked) >= 200 // 16 + 1
        for batch in chunked:
            assert sum(c.end - c.start for c in batch.prefills) <= 16
            assert len(batch.decodes) == 3  # the running streams advanced in the same step

    asyncio.run(scenario())


def test_turn_two_reuses_the_cached_prefix_of_turn_one_and_answers_the_same() -> None:
    async def scenario() -> None:
        runner = FakeModelRunner(cache_rows=2)
        generator = make(runner, max_num_seqs=1)
        first = prompt(40, "chat")
        answer, _, _ = await collect(generator.generate(first, None, GREEDY))
        second = f"{first}{answer} and then?"
        reply, _, _ = await collect(generator.generate(second, None, GREEDY))
        await generator.close()
        last = [b for b in runner.batches if b.prefills][-1].prefills[0]
        # turn 1's prompt and its answer (but the last, unfed, token) come from the cache
        assert last.start == 40 + 12 - 1
        assert reply == await alone(second)

    asyncio.run(scenario())


def test_a_cached_prefix_is_evicted_for_a_new_request_when_no_cache_row_is_free() -> None:
    async def scenario() -> None:
        runner = FakeModelRunner(cache_rows=1)
        generator = make(runner, max_num_seqs=1)
        await collect(generator.generate(prompt(10, "a"), None, GREEDY))
        other, _, _ = await collect(generator.generate(prompt(10, "b"), None, GREEDY))
        again, _, _ = await collect(generator.generate(prompt(10, "a"), None, GREEDY))
        await generator.close()
        assert runner.batches[-12].prefills[0].start == 0  # "a" was recomputed, not reused
        assert other == await alone(prompt(10, "b"))
        assert again == await alone(prompt(10, "a"))

    asyncio.run(scenario())


def test_a_client_that_goes_away_frees_its_cache_row_within_one_step() -> None:
    async def scenario() -> None:
        runner = FakeModelRunner(cache_rows=2, delay_s=0.002)
        generator = make(runner, max_num_seqs=2)
        engine = generator.engine
        steps = generator.generate(
            prompt(4), None, SamplingParams(temperature=0, max_new_tokens=500)
        )
        await steps.__anext__()
        assert engine.scheduler.cache_rows.free_count == 1
        steps_before = len(runner.batches)
        await steps.aclose()  # what the HTTP layer does when the client disconnects
        await asyncio.sleep(0.01)
        assert engine.scheduler.cache_rows.free_count == 2
        assert engine.admission.queue_length == 0
        assert len(runner.batches) <= steps_before + 1  # at most the step already running
        await generator.close()

    asyncio.run(scenario())


def test_a_sequence_leaves_once_and_says_why() -> None:
    async def scenario() -> None:
        runner = FakeModelRunner(cache_rows=2, delay_s=0.002)
        generator = make(runner, max_num_seqs=2)
        engine = generator.engine
        long = generator.generate(
            prompt(4), None, SamplingParams(temperature=0, max_new_tokens=500)
        )
        await long.__anext__()
        (seq,) = engine.scheduler.running
        assert seq.status is SequenceStatus.RUNNING and seq.end is None
        engine.abort(seq)  # through the inbox: the step that drains it takes the sequence out
        engine.abort(seq)  # twice (a disconnect and a close): still out once
        for _ in range(100):
            if seq.finished:
                break
            await asyncio.sleep(0.005)
        assert seq.status is SequenceStatus.FINISHED and seq.end == "aborted"
        assert seq not in engine.scheduler.running and engine.scheduler.cache_rows.free_count == 2
        await long.aclose()
        _, finish, _ = await collect(generator.generate(prompt(3), None, GREEDY))
        assert finish == "length"
        await generator.close()

    asyncio.run(scenario())


def test_requests_beyond_the_running_limit_wait_and_then_run() -> None:
    async def scenario() -> None:
        runner = FakeModelRunner(cache_rows=2)
        generator = make(runner, max_num_seqs=2)
        results = await asyncio.gather(
            *(collect(generator.generate(prompt(3, f"w{i}"), None, GREEDY)) for i in range(5))
        )
        await generator.close()
        assert all(r[1] == "length" and r[2] == 12 for r in results)
        assert max(len(b.decodes) + len(b.prefills) for b in runner.batches) <= 2

    asyncio.run(scenario())


def test_a_failed_step_fails_its_requests_and_the_engine_serves_the_next_one() -> None:
    async def scenario() -> None:
        runner = FakeModelRunner(cache_rows=2)
        generator = make(runner, max_num_seqs=2)
        runner.fail_next = OutOfDeviceMemory("the device ran out of memory")
        with pytest.raises(ServingError) as failed:
            await collect(generator.generate(prompt(3), None, GREEDY))
        assert failed.value.code == OutOfDeviceMemory.code
        assert generator.engine.scheduler.cache_rows.free_count == 2
        text, finish, _ = await collect(generator.generate(prompt(3), None, GREEDY))
        await generator.close()
        assert finish == "length" and text == await alone(prompt(3))

    asyncio.run(scenario())


def test_a_stop_token_ends_the_stream_with_reason_stop() -> None:
    async def scenario() -> None:
        runner = FakeModelRunner(cache_rows=1, stop_at=6)
        generator = make(runner, max_num_seqs=1)
        text, finish, produced = await collect(generator.generate(prompt(3), None, GREEDY))
        await generator.close()
        assert (finish, produced) == ("stop", 4)
        assert f"t{STOP}" not in text

    asyncio.run(scenario())


def test_prompt_chunks_shrink_when_they_slow_the_streams_and_grow_back() -> None:
    controller = ChunkController(max_chunk=256, max_slowdown=2.5, initial=64)
    controller.observe(0.010, decodes=7, prefill_tokens=0)  # a decode-only step: 10 ms
    controller.observe(0.100, decodes=7, prefill_tokens=64)  # 4x the target of 25 ms
    assert controller.chunk == 32  # halved at most per step
    for _ in range(5):
        controller.observe(0.040, decodes=7, prefill_tokens=controller.chunk)
    assert controller.chunk < 32
    shrunk = controller.chunk
    for _ in range(40):
        controller.observe(0.012, decodes=7, prefill_tokens=controller.chunk)  # room again
    assert shrunk < controller.chunk == 256
    controller.observe(5.0, decodes=0, prefill_tokens=2000)  # nobody decoding: no change
    assert controller.chunk == 256


def test_a_short_prompt_arriving_mid_stream_is_prefilled_in_one_step() -> None:
    async def scenario() -> None:
        runner = FakeModelRunner(cache_rows=4, delay_s=0.001)
        generator = make(runner, max_num_seqs=4, prefill_chunk_while_decoding=4, short_prompt=64)
        running = asyncio.ensure_future(
            collect(
                generator.generate(
                    prompt(3), None, SamplingParams(temperature=0, max_new_tokens=100)
                )
            )
        )
        while not runner.batches or not runner.batches[-1].decodes:
            await asyncio.sleep(0.001)
        await collect(generator.generate(prompt(50, "short"), None, GREEDY))
        await running
        await generator.close()
        chunks = [c for b in runner.batches for c in b.prefills if c.prompt.words[0] == "short0"]
        assert [(c.start, c.end) for c in chunks] == [(0, 50)]

    asyncio.run(scenario())


class Incomparable:
    """A position key whose comparison raises: a bug `CacheRows` trips over."""

    def __eq__(self, other: object) -> bool:
        raise TypeError("this key cannot be compared")

    __hash__ = object.__hash__


def test_a_prompt_the_scheduler_cannot_admit_fails_alone_and_once() -> None:
    """Issue 23, finding 1: an empty prompt made every step raise in `CacheRows`, forever
    (other requests waited, the log grew by the step). Now that request ends once, with its
    reason, and the others are served."""

    async def scenario() -> None:
        runner = FakeModelRunner(cache_rows=2)
        generator = make(runner, max_num_seqs=2)
        await collect(generator.generate("x y", None, GREEDY))  # leaves a prefix to compare
        engine = generator.engine
        empty = engine.submit(runner.prepare("", None, GREEDY), engine.admission.admit())
        broken_prompt = runner.prepare("x b", None, GREEDY)
        broken_prompt.words = [Incomparable(), "b"]
        broken = engine.submit(broken_prompt, engine.admission.admit())
        served = generator.generate(prompt(4), None, GREEDY)
        text, finish, _ = await asyncio.wait_for(collect(served), 5)
        assert finish == "length" and text == await alone(prompt(4))
        first = await asyncio.wait_for(empty.outbox.get(), 1)
        assert isinstance(first, ServingError) and first.code == 40001
        assert "empty" in first.message
        second = await asyncio.wait_for(broken.outbox.get(), 1)
        assert isinstance(second, ServingError) and "cannot be compared" in second.message
        assert empty.outbox.empty() and broken.outbox.empty()  # once each
        assert not engine.scheduler.has_work
        await generator.close()

    asyncio.run(scenario())


@dataclass
class GuidedPrompt(FakePrompt):
    """A prompt under an output constraint that dead-ends at its `dead_at`-th token."""

    dead_at: int = 0
    sampled: int = 0

    @property
    def constrained(self) -> bool:
        return True

    @property
    def constraint_failed(self) -> bool:
        return self.sampled >= self.dead_at


@dataclass
class GuidedRunner(FakeModelRunner):
    """Constrained prompts count their sampled tokens, as a runner's guides would."""

    def prepare(
        self,
        prompt: str,
        images: ImageFeatures | None,
        params: SamplingParams,
        constraint: CompiledConstraint | None = None,
    ) -> FakePrompt:
        plain = super().prepare(prompt, images, params)
        if constraint is None:
            return plain
        dead_at = int(constraint.constraint.spec)
        return GuidedPrompt(plain.words, plain.limit, plain.seed, plain.stops, dead_at)

    def execute(self, batch: ModelBatch[FakePrompt]) -> Sequence[int]:
        sampled = super().execute(batch)
        rows = [d.prompt for d in batch.decodes] + [c.prompt for c in batch.prefills if c.samples]
        for row in rows:
            if isinstance(row, GuidedPrompt):
                row.sampled += 1
        return sampled


def dead_end_at(tokens: int) -> CompiledConstraint:
    return FakeCompiledConstraint(OutputConstraint("grammar", str(tokens)))


def test_a_dead_ended_constraint_ends_its_answer_alone_with_grammar_error() -> None:
    async def scenario() -> None:
        free_alone = await alone(prompt(5, "f"))
        runner = GuidedRunner(cache_rows=2)
        generator = make(runner, max_num_seqs=2)
        guided, free = await asyncio.gather(
            collect(generator.generate(prompt(3, "g"), None, GREEDY, constraint=dead_end_at(3))),
            collect(generator.generate(prompt(5, "f"), None, GREEDY)),
        )
        text, finish, produced = guided
        # Its third token is whatever was sampled where nothing was allowed: not shown.
        assert (finish, produced, text.count(" t")) == ("grammar_error", 3, 2)
        assert free == (free_alone, "length", 12)
        assert generator.engine.scheduler.cache_rows.free_count == 2
        await generator.close()

    asyncio.run(scenario())


def test_only_steps_with_a_constrained_prompt_running_say_so() -> None:
    async def scenario() -> None:
        runner = GuidedRunner(cache_rows=2)
        generator = make(runner, max_num_seqs=2)
        await collect(generator.generate(prompt(3), None, GREEDY))
        assert not any(b.constrained for b in runner.batches)
        runner.batches.clear()
        await asyncio.gather(
            collect(generator.generate(prompt(3, "g"), None, GREEDY, constraint=dead_end_at(2))),
            collect(generator.generate(prompt(3, "f"), None, GREEDY)),
        )
        flags = [b.constrained for b in runner.batches]
        # While the constrained one runs (its two steps), then never again once it left.
        assert flags[:2] == [True, True] and not any(flags[2:])
        # One whose client goes away mid-answer leaves the count too.
        long = SamplingParams(temperature=0, max_new_tokens=500)
        gone = generator.generate(prompt(3, "a"), None, long, constraint=dead_end_at(400))
        await gone.__anext__()
        await gone.aclose()
        while generator.engine.scheduler.running:  # the abort goes through the inbox
            await asyncio.sleep(0.001)
        runner.batches.clear()
        await collect(generator.generate(prompt(3, "h"), None, GREEDY))
        assert runner.batches and not any(b.constrained for b in runner.batches)
        await generator.close()

    asyncio.run(scenario())
