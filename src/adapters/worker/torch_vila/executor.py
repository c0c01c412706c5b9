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

P = ParamSpec("P")
R = TypeVar("R")


class ModelExecutor:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vilaserve-model")

    async def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def submit(self, fn: Callable[[], None]) -> None:
        """Queues `fn` behind the thread's other work and returns at once."""
        self._pool.submit(fn)

    def call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Runs `fn` on the model thread and waits for it (loading, before serving starts)."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
