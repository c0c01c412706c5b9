"""The compute threads give a core back while another process waits for it, and take it back
once it is free again (compute_threads.py), from /proc readings that fakes stand in for."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from vilaserve.adapters.worker.torch_vila.compute_threads import (
    MODEL_THREAD_NAME,
    ComputeThreads,
    HostCpu,
    ThreadRule,
    name_os_thread,
)


def test_waits_in_the_run_queue_drop_a_thread_and_never_below_one() -> None:
    rule = ThreadRule(most=2, cores=2, free_samples=2)
    assert rule.next(0.3, 0.3, now=0.0) == 2  # serving alone: its turns
    assert rule.next(1.0, 1.0, now=0.2) == 1
    assert rule.next(1.0, 1.5, now=0.4) == 1


def test_waits_behind_our_own_event_loop_alone_keep_every_thread() -> None:
    rule = ThreadRule(most=2, cores=2, free_samples=2)
    # c=8 streams: the event loop frames tokens while the step runs; nobody else is busy.
    assert rule.next(0.6, 0.1, now=0.0) == 2


def test_a_thread_comes_back_once_a_core_is_free_for_two_samples() -> None:
    rule = ThreadRule(most=2, cores=2, free_samples=2)
    rule.next(1.0, 1.0, now=0.0)
    assert rule.next(0.0, 0.1, now=0.2) == 1  # one free sample is not enough
    assert rule.next(0.0, 0.1, now=0.4) == 2


def test_bursts_a_second_apart_keep_the_thread_away_with_the_defaults() -> None:
    """An attacker's requests, a build's compiler runs: each return of the thread would meet
    the next burst's first step with a thread that waits."""
    rule = ThreadRule(most=2, cores=2)
    rule.next(1.0, 1.0, now=0.0)
    for step in range(1, 50):  # 10 s: 0.6 s of a busy core, then 0.4 s of quiet, in turn
        busy = step % 5 < 3
        assert rule.next(0.0, 1.0 if busy else 0.05, now=step * 0.2) == 1
    for step in range(50, 60):  # then quiet for 2 s
        rule.next(0.0, 0.05, now=step * 0.2)
    assert rule.threads == 2


def test_no_trial_while_the_other_core_is_taken() -> None:
    rule = ThreadRule(most=2, cores=2, free_samples=2)
    rule.next(1.0, 1.0, now=0.0)
    for step in range(1, 200):  # 40 s of a process that keeps a whole core
        assert rule.next(0.0, 1.0, now=step * 0.2) == 1


def test_a_trial_that_brings_the_waits_back_is_tried_again_later_and_later() -> None:
    rule = ThreadRule(most=2, cores=2, retry_s=1.0, retry_max_s=4.0, free_samples=2)
    rule.next(1.0, 1.0, now=0.0)
    # A client using 0.6 of a core between our answers: part of a core free.
    assert rule.next(0.0, 0.6, now=0.6) == 1
    assert rule.next(0.0, 0.6, now=1.0) == 2  # the trial, after retry_s
    assert rule.next(1.0, 1.0, now=1.2) == 1  # it failed: 2 s until the next one
    assert rule.next(0.0, 0.6, now=3.0) == 1
    assert rule.next(0.0, 0.6, now=3.2) == 2
    assert rule.next(1.0, 1.0, now=3.4) == 1  # failed again: 4 s, the most
    assert rule.next(0.0, 0.6, now=7.2) == 1
    assert rule.next(0.0, 0.6, now=7.4) == 2
    assert rule.next(0.1, 0.6, now=11.5) == 2  # this one held: back to 1 s next time
    assert rule.next(1.0, 1.0, now=11.7) == 1
    assert rule.next(0.0, 0.6, now=12.7) == 2


def test_more_than_two_threads_step_down_and_up_one_at_a_time() -> None:
    rule = ThreadRule(most=4, cores=4, free_samples=2)
    assert rule.next(1.0, 2.0, now=0.0) == 3
    assert rule.next(1.0, 2.0, now=0.2) == 2
    assert rule.next(0.0, 0.1, now=0.4) == 2
    assert rule.next(0.0, 0.1, now=0.6) == 3
    assert rule.next(0.0, 0.1, now=0.8) == 3
    assert rule.next(0.0, 0.1, now=1.0) == 4
    assert rule.next(0.0, 0.1, now=1.2) == 4


class FakeProc:
    """/proc/stat (per-CPU lines, ticks of 10 ms), /proc/self/task and each task's comm and
    schedstat (ns on CPU, ns waiting in the run queue, slices)."""

    def __init__(self) -> None:
        self.cpu_ticks = {0: 0, 1: 0, 2: 0}
        self.tasks: dict[str, tuple[str, int]] = {}  # tid: (name, ns waited)

    def read(self, path: str) -> str:
        if path == "/proc/stat":
            lines = ["cpu  999 0 0 0 0 0 0 0"]
            lines += [f"cpu{c} {t} 0 0 5000 0 0 0 0 0 0" for c, t in self.cpu_ticks.items()]
            return "\n".join(lines) + "\nintr 1 2 3\n"
        if path == "/proc/self/task":
            return " ".join(self.tasks)
        tid, leaf = path.removeprefix("/proc/self/task/").split("/")
        name, waited = self.tasks[tid]
        return name + "\n" if leaf == "comm" else f"123 {waited} 7\n"


def test_host_cpu_counts_only_this_process_cores_and_only_its_compute_threads() -> None:
    proc, own, now = FakeProc(), [0.0], [0.0]
    proc.tasks = {"10": ("python", 0), "11": (MODEL_THREAD_NAME, 0), "12": (MODEL_THREAD_NAME, 0)}
    host = HostCpu({0, 1}, proc.read, own_cpu_s=lambda: own[0], clock=lambda: now[0])
    now[0] = 1.0
    proc.cpu_ticks = {0: 100, 1: 80, 2: 100}  # 1.8 s busy on ours, cpu2 is not ours
    own[0] = 0.6  # of which 0.6 s was this process
    proc.tasks = {"10": ("python", 9 * 10**9), "11": (MODEL_THREAD_NAME, 3 * 10**8),
                  "12": (MODEL_THREAD_NAME, 5 * 10**8)}  # fmt: skip
    wait, others = host.sample()
    assert others == pytest.approx(1.2)
    assert wait == pytest.approx(0.8)  # the event loop's 9 s of waiting is not the model's


def test_a_thread_that_ends_between_the_listing_and_the_read_is_skipped() -> None:
    class Ending(FakeProc):
        def read(self, path: str) -> str:
            if path.endswith("/11/schedstat") and self.ended:
                raise FileNotFoundError(path)
            return super().read(path)

    proc = Ending()
    proc.ended = False
    proc.tasks = {"11": (MODEL_THREAD_NAME, 10**9), "12": (MODEL_THREAD_NAME, 0)}
    host = HostCpu({0}, proc.read, own_cpu_s=lambda: 0.0, clock=iter([0.0, 1.0]).__next__)
    proc.ended = True
    proc.tasks["12"] = (MODEL_THREAD_NAME, 2 * 10**8)
    wait, _ = host.sample()
    assert wait == pytest.approx(0.2)  # the ended thread's total is not a negative wait


class FakeHost:
    def __init__(self, cpus: int) -> None:
        self.cpus = frozenset(range(cpus))
        self.next = (0.0, 0.0)

    def sample(self) -> tuple[float, float]:
        return self.next


def test_apply_sets_the_count_on_the_model_thread_once_per_change() -> None:
    host, now, applied = FakeHost(2), [0.0], []
    threads = ComputeThreads(
        host,  # type: ignore[arg-type]
        ThreadRule(most=2, cores=2, free_samples=2),
        applied.append,
        clock=lambda: now[0],
    )
    threads.apply()
    assert applied == []
    host.next = (1.0, 1.0)  # waits, and another process on one core
    threads.sample()
    threads.apply()
    threads.apply()
    assert applied == [1]
    host.next = (0.0, 0.05)
    for _ in range(2):
        now[0] += 0.2
        threads.sample()
    threads.apply()
    assert applied == [1, 2]


def test_unreadable_proc_means_every_thread_and_no_more_sampling() -> None:
    class Broken(FakeHost):
        def sample(self) -> tuple[float, float]:
            raise OSError("no /proc")

    applied: list[int] = []
    threads = ComputeThreads(
        Broken(2), ThreadRule(most=2, cores=2, free_samples=2), applied.append, interval_s=0.01
    )  # type: ignore[arg-type]
    threads.wanted = 1
    threads.start()
    assert threads.stopped.wait(5)
    threads.apply()
    assert threads.wanted == 2 and applied == []


@pytest.mark.skipif(sys.platform != "linux", reason="thread names in /proc are Linux's")
def test_threads_a_named_thread_starts_inherit_its_name() -> None:
    """What finding the OpenMP threads rests on: they inherit the model thread's name."""
    names: list[str] = []

    def child() -> None:
        names.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text())

    def model() -> None:
        name_os_thread(MODEL_THREAD_NAME)
        started = threading.Thread(target=child)
        started.start()
        started.join()

    thread = threading.Thread(target=model)
    thread.start()
    thread.join()
    assert names == [MODEL_THREAD_NAME + "\n"]
