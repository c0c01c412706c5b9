"""The engine loop: receive -> schedule -> execute -> update -> deliver, on the model thread.

The model thread works through one queue, in order (`ModelRunner.submit`, executor.py): that
queue is the engine's inbox. New requests, aborts and `fail_all` arrive in it as small pieces
of work, image encodes as larger ones, and each engine step (`_step`: schedule -> execute ->
update -> deliver) is one piece that, while there is work, queues the next behind whatever
arrived meanwhile. So every change to the engine's state happens on the model thread, in
arrival order, without a lock, and the model never waits for the event loop between steps.
The event loop only puts work in and receives each step's tokens (one callback per step hands
them to the requests' queues). A client that goes away has its sequence out and its cache row
free before the next step runs. A sequence leaves only through `EngineSequence.finish(reason)`.

The engine owns the worker's one admission queue (admission.py): a request is counted from
its acceptance (before its pictures are encoded) to its sequence's end, and the load figures
it reports are that queue's counts, the same ones /worker_get_status reports.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from functools import partial

from vilaserve.application.worker.engine.admission import Admission, Ticket
from vilaserve.application.worker.engine.cache_rows import CacheRows
from vilaserve.application.worker.engine.observer import EngineObserver, NoObserver
from vilaserve.application.worker.engine.scheduler import (
    ScheduledStep,
    Scheduler,
    SchedulerConfig,
)
from vilaserve.application.worker.engine.sequence import EngineSequence, Outcome
from vilaserve.domain.shared.errors import ErrorCode, ServingError
from vilaserve.domain.worker.ports import ModelRunner, PreparedPrompt

log = logging.getLogger(__name__)

Delivery = list[tuple[EngineSequence, Outcome]]


class Engine:
    def __init__(
        self,
        runner: ModelRunner[PreparedPrompt],
        config: SchedulerConfig,
        observer: EngineObserver | None = None,
    ) -> None:
        self.runner = runner
        self.scheduler = Scheduler(config, CacheRows(runner.num_cache_rows))
        self._observer: EngineObserver = observer or NoObserver()
        self._ids = itertools.count()
        # Model thread only: a step is queued; everything ends (fail_all) with this error.
        self._stepping = False
        self._failing: ServingError | None = None
        self._closed = False
        self.admission = Admission(
            config.max_requests, self._report_load, max_in_service=config.max_in_service
        )

    # ---------------------------------------------------------------- from the event loop
    def submit(self, prompt: PreparedPrompt, ticket: Ticket) -> EngineSequence:
        """Queues a prepared prompt; its tokens arrive on the returned sequence's outbox.

        `ticket`: its request's place in `admission` (`admission.admit()`); from here the
        sequence's end ends it."""
        ticket.submitted()
        seq = EngineSequence(next(self._ids), prompt, time.perf_counter(), ticket)
        seq.loop = asyncio.get_running_loop()
        self.runner.submit(partial(self._receive, seq))
        return seq

    def abort(self, seq: EngineSequence) -> None:
        """The request is gone: it leaves before the next step."""
        if not self._closed:  # closed: the model thread takes no more work
            self.runner.submit(partial(self._abort, seq))

    def fail_all(self, error: ServingError) -> None:
        """Ends every sequence, queued or running, with `error`, and any submitted later."""
        self.runner.submit(partial(self._fail_all, error))

    async def close(self) -> None:
        self._closed = True

    # ---------------------------------------------------------------- on the model thread
    def _receive(self, seq: EngineSequence) -> None:
        if self._failing is not None:
            seq.finish("failed")
            self._send([(seq, self._failing)])
            return
        self.scheduler.add(seq)
        if not self._stepping and not self._closed:
            self._stepping = True
            self.runner.submit(self._step)

    def _abort(self, seq: EngineSequence) -> None:
        if not seq.finished:
            self.scheduler.remove(seq)
            seq.finish("aborted")

    def _fail_all(self, error: ServingError) -> None:
        self._failing = error
        self._end_everyone(error)

    def _step(self) -> None:
        try:
            more = self._run_one_step()
        except Exception as exc:  # the engine must outlive anything one step does
            # Each phase fails its own requests; this is the last resort for a bug elsewhere
            # in the step: everyone in the engine ends once, so the step is not retried
            # forever on the same state (and the log does not grow by the step).
            log.exception("engine step crashed")
            self._end_everyone(
                ServingError(
                    f"internal error: {type(exc).__name__}: {exc}", ErrorCode.INTERNAL_ERROR
                )
            )
            more = False
        if more and not self._closed:
            self.runner.submit(self._step)  # behind what arrived during this one
        else:
            self._stepping = False

    def _run_one_step(self) -> bool:
        scheduler = self.scheduler
        if not scheduler.has_work:
            self.admission.report()
            return False
        step = scheduler.schedule()
        for seq, exc in step.refused:
            self._refuse(seq, exc)
        self._report_admissions(step)
        if not step.batch:
            self.admission.report()
            return False  # every cache row is taken by sequences that wait on nothing: impossible
        started = time.perf_counter()
        try:
            sampled = list(self.runner.execute(step.batch))
            now = time.perf_counter()
            outcome = scheduler.update(step, sampled)
        except ServingError as error:
            self._fail(step, error)
            return True
        except Exception as exc:  # one step's failure must not end the engine
            log.exception("engine step failed")
            message = f"internal error: {type(exc).__name__}: {exc}"
            self._fail(step, ServingError(message, ErrorCode.INTERNAL_ERROR))
            return True
        if step.prefilling:
            self._charge_prefill(step, now - started)
        prefilled = step.batch.num_tokens - len(step.decoding)
        scheduler.chunks.observe(now - started, len(step.decoding), prefilled)
        self._observer.step(
            tokens=step.batch.num_tokens, decodes=len(step.decoding), seconds=now - started
        )
        delivery: Delivery = []
        for seq, out in outcome.tokens:
            if seq.last_token_at == 0.0:
                self._observer.first_token(now - seq.arrived)
            else:
                self._observer.inter_token(now - seq.last_token_at)
            seq.last_token_at = now
            delivery.append((seq, out))
            if out.finish_reason is not None:
                self._observer.finished(reason=out.finish_reason, generated=len(seq.output))
        self._send(delivery)
        self.admission.report()  # the cache's use changed with the step
        return True

    def _send(self, delivery: Delivery) -> None:
        """Hands the step's tokens to their requests' queues on the event loop, in one call per
        loop (all requests normally share one)."""
        by_loop: dict[asyncio.AbstractEventLoop, Delivery] = {}
        for seq, out in delivery:
            assert seq.loop is not None
            by_loop.setdefault(seq.loop, []).append((seq, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                for seq, _ in items:
                    self._abort(seq)

    def _end_everyone(self, error: ServingError) -> None:
        scheduler = self.scheduler
        everyone = (*scheduler.running, *scheduler.waiting)
        scheduler.fail(tuple(scheduler.running))  # their cache rows' contents are not trusted
        scheduler.waiting.clear()
        for seq in everyone:
            seq.finish("failed")
        self._send([(seq, error) for seq in everyone])

    def _refuse(self, seq: EngineSequence, exc: Exception) -> None:
        """A sequence the scheduler could not admit: its request ends with the reason."""
        seq.finish("failed")
        if isinstance(exc, ServingError):
            error = exc
        else:
            log.error("sequence refused by the scheduler", exc_info=exc)
            error = ServingError(
                f"internal error: {type(exc).__name__}: {exc}", ErrorCode.INTERNAL_ERROR
            )
        self._send([(seq, error)])

    def _fail(self, step: ScheduledStep, error: ServingError) -> None:
        failed = step.decoding + step.prefilling
        self.scheduler.fail(failed)
        for seq in failed:
            seq.finish("failed")
        self._send([(seq, error) for seq in failed])
        log.warning(
            "engine step failed",
            extra={
                "sequences": len(failed),
                "error_code": int(error.code),
                "reason": error.message,
            },
        )

    def _report_admissions(self, step: ScheduledStep) -> None:
        for seq, chunk in zip(step.prefilling, step.batch.prefills, strict=True):
            if chunk.start == seq.reused:  # its first chunk
                seq.queued_s = time.perf_counter() - seq.arrived
                self._observer.admitted(prompt_tokens=seq.prompt_length, reused_tokens=seq.reused)

    def _charge_prefill(self, step: ScheduledStep, seconds: float) -> None:
        """Each sequence whose chunk ran waited for the whole step's model work (the decode
        rows and the other chunks in it too); the one whose last chunk ran also waited for the
        sampling of its first token. A runner that does not split its step: all of it is
        prefill."""
        timing = self.runner.last_step_timing
        if timing is None:
            forward_s, sample_s = seconds, 0.0
        else:
            forward_s, sample_s = timing.forward_s, timing.sample_s
        for seq, chunk in zip(step.prefilling, step.batch.prefills, strict=True):
            seq.prefill_s += forward_s
            if chunk.samples:
                seq.first_sample_s = sample_s

    def _report_load(self, running: int, waiting: int) -> None:
        """The admission's counts as the load figures, with the cache's use at that moment.

        Called under the admission's lock on whichever thread changed the counts; it only
        reads how many cache rows are free (one `len`), so the model thread still alone
        changes them. Sequences end after their cache row is given back, so a request seen gone
        is seen with its row free."""
        rows = self.scheduler.cache_rows
        self._observer.load(
            running=running, waiting=waiting, kv_usage=rows.used_count / rows.num_rows
        )


def _put_all(items: Delivery) -> None:
    for seq, out in items:
        seq.outbox.put_nowait(out)
