"""The compute threads' count reaches torch on the model thread, and a loaded runtime's
OpenMP threads carry the model thread's name (what compute_threads.py finds them by)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vilaserve.adapters.worker.torch_vila.compute_threads import (
    MODEL_THREAD_NAME,
    ComputeThreads,
    ThreadRule,
)
from vilaserve.adapters.worker.torch_vila.executor import ModelExecutor
from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions

needs_two_threads = pytest.mark.skipif(
    torch.get_num_threads() < 2, reason="one torch thread: there is no thread to give back"
)


class StubHost:
    def __init__(self) -> None:
        self.cpus = frozenset(range(torch.get_num_threads()))
        self.reading = (0.0, 0.0)

    def sample(self) -> tuple[float, float]:
        return self.reading


@needs_two_threads
def test_the_model_thread_runs_with_the_count_decided_and_gets_it_back() -> None:
    executor = ModelExecutor()
    most = executor.call(torch.get_num_threads)
    host, now = StubHost(), [0.0]
    rule = ThreadRule(most=most, cores=len(host.cpus), free_samples=2)
    threads = ComputeThreads(host, rule, torch.set_num_threads, clock=lambda: now[0])  # type: ignore[arg-type]
    executor.before_each(threads.apply)
    try:
        host.reading = (1.0, 1.0)  # the compute threads waited a core's worth
        threads.sample()
        assert executor.call(torch.get_num_threads) == most - 1
        host.reading = (0.0, 0.0)
        for _ in range(2):
            now[0] += 0.2
            threads.sample()
        assert executor.call(torch.get_num_threads) == most
    finally:
        executor.shutdown()


@needs_two_threads
@pytest.mark.skipif(sys.platform != "linux", reason="thread names in /proc are Linux's")
def test_a_loaded_runtime_names_its_compute_threads(tiny_vila_siglip: Path) -> None:
    runtime = VilaRuntime.load(VilaRuntimeOptions(model_path=str(tiny_vila_siglip), device="cpu"))
    big = torch.ones(256, 256)
    runtime.executor.call(lambda: big @ big)  # a parallel region started on the model thread
    named = [
        task
        for task in Path("/proc/self/task").iterdir()
        if (task / "comm").read_text().strip() == MODEL_THREAD_NAME
    ]
    assert len(named) >= torch.get_num_threads()
