"""The engine loop: schedule -> execute -> update, one model step at a time.

It runs as one asyncio task. Each step's model work hops onto the runner's own model thread
(one hop per step for the whole batch, not per token per request); scheduling, bookkeeping and
handing tokens to the requests' queues happen on the event loop between steps, which is also
where new requests join and aborted ones leave. So a client that goes away has its sequence out
and its slot free before the next step starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time

from vilaserve.application.worker.engine.observer import EngineObserver, NoObserver
from vilaserve.application.worker.engine.scheduler import (
    ScheduledStep,
    Scheduler,
    SchedulerConfig,
    StepOutcome,
)
from vilaserve.application.worker.engine.sequence import Sequence
from vilaserve.application.worker.engine.slot_table import SlotTable
from vilaserve.domain.shared.errors import ErrorCode, ServingError
from vilaserve.domain.worker.ports import ModelRunner, PreparedPrompt

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        runner: ModelRunner[PreparedPrompt],
        config: SchedulerConfig,
        observer: EngineObserver | None = None,
    ) -> None:
        self.runner = runner
        self.scheduler = Scheduler(config, SlotTable(runner.num_slots))
        self._observer: EngineObserver = observer or NoObserver()
        self._ids = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.steps = 0

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def submit(self, prompt: PreparedPrompt) -> Sequence:
        """Queues a prepared prompt; its tokens arrive on the returned sequence's outbox."""
        self._ensure_running()
        seq = Sequence(next(self._ids), prompt, time.perf_counter())
        self.scheduler.add(seq)
        assert self._wake is not None
        self._wake.set()
        return seq

    def abort(self, seq: Sequence) -> None:
        """The request is gone: it leaves now (between steps) or right after the running one."""
        seq.aborted = True
        if self._task is not None and self._stepping is None:
            self._leave(seq)
        elif self._wake is not None:
            self._wake.set()

    _stepping: ScheduledStep | None = None

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            if not self.scheduler.has_work:
                self._report_load()
                self._wake.clear()
                await self._wake.wait()
                continue
            self._drop_aborted()
            step = self.scheduler.schedule()
            self._report_admissions(step)
            if not step.batch:
                # Sequences wait for a slot that no running sequence will free: impossible
                # while the table has at least max_num_seqs slots; guard against a spin anyway.
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._run(step)

    async def _run(self, step: ScheduledStep) -> None:
        started = time.perf_counter()
        self._stepping = step
        try:
            sampled = list(await self.runner.run(step.batch))
        except ServingError as error:
            self._fail(step, error)
            return
        except Exception as exc:  # one step's failure must not end the engine
            log.exception("engine step failed")
            self._fail(
                step,
                ServingError(
                    f"internal error: {type(exc).__name__}: {exc}", ErrorCode.INTERNAL_ERROR
                ),
            )
            return
        finally:
            self._stepping = None
        now = time.perf_counter()
        self.steps += 1
        self._observer.step(
            tokens=step.batch.num_tokens, decodes=len(step.decoding), seconds=now - started
        )
        self._deliver(self.scheduler.update(step, sampled), now)
        self._drop_aborted()
        self._report_load()

    def _deliver(self, outcome: StepOutcome, now: float) -> None:
        for seq, out in outcome.tokens:
            if seq.last_token_at == 0.0:
                self._observer.first_token(now - seq.arrived)
            else:
                self._observer.inter_token(now - seq.last_token_at)
            seq.last_token_at = now
            seq.outbox.put_nowait(out)
            if out.finish_reason is not None:
                self._observer.finished(reason=out.finish_reason, generated=len(seq.output))

    def _fail(self, step: ScheduledStep, error: ServingError) -> None:
        failed = step.decoding + step.prefilling
        self.scheduler.fail(failed)
        for seq in failed:
            seq.finished = True
            seq.outbox.put_nowait(error)
        log.warning(
            "engine step failed",
            extra={
                "sequences": len(failed),
                "error_code": int(error.code),
                "reason": error.message,
            },
        )

    def _drop_aborted(self) -> None:
        for seq in [s for s in self.scheduler.running if s.aborted]:
            self._leave(seq)
        for seq in [s for s in self.scheduler.waiting if s.aborted]:
            self._leave(seq)

    def _leave(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        seq.finished = True

    def _report_admissions(self, step: ScheduledStep) -> None:
        for seq, chunk in zip(step.prefilling, step.batch.prefills, strict=True):
            if chunk.start == seq.reused:  # its first chunk
                self._observer.admitted(prompt_tokens=seq.prompt_length, reused_tokens=seq.reused)

    def _report_load(self) -> None:
        slots = self.scheduler.slots
        self._observer.load(
            running=self.num_running,
            waiting=self.num_waiting,
            kv_usage=slots.used_count / slots.num_slots,
        )
