"""One thread owns the model: engine steps and image encodes queue on it, the event loop
stays free.

Torch releases the GIL inside kernels, so HTTP handling, status and heartbeats keep running
while a step computes; and serialising steps avoids two requests fighting over the cores.

All torch work with parallel regions belongs on this thread, the model's load included: each
thread that starts an OpenMP region gets a team of its own, and once libgomp manages more
threads than there are cores it stops spinning between regions. A decode step runs a hundred
short regions; with sleeping teams it took 3x as long (11.4 ms instead of 3.8 ms per token,
SmolLM2 W4A16 on 2 AVX2 cores).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from vilaserve.adapters.worker.torch_vila.compute_threads import MODEL_THREAD_NAME, name_os_thread

P = ParamSpec("P")
R = TypeVar("R")


def _nothing() -> None:
    pass


class ModelExecutor:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=MODEL_THREAD_NAME,
            initializer=name_os_thread,
            initargs=(MODEL_THREAD_NAME,),
        )
        self._before_each: Callable[[], None] = _nothing

    def before_each(self, hook: Callable[[], None]) -> None:
        """`hook` runs on the model thread before each piece of work (compute_threads.py)."""
        self._before_each = hook

    def _then(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        self._before_each()
        return fn(*args, **kwargs)

    async def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: self._then(fn, *args, **kwargs))

    def submit(self, fn: Callable[[], None]) -> None:
        """Queues `fn` behind the thread's other work and returns at once."""
        self._pool.submit(self._then, fn)

    def call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Runs `fn` on the model thread and waits for it (loading, before serving starts)."""
        return self._pool.submit(self._then, fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
