"""The use case that reports the worker's status: its model names, speed and queue length."""

from __future__ import annotations

from collections.abc import Sequence

from vilaserve.domain.shared.worker_status import WorkerStatus
from vilaserve.domain.worker.ports import TextGenerator


class ReportStatus:
    """`/worker_get_status` (and the heartbeats): the model names, a speed weight and the
    queue length, which is the generator's admission queue, the one /metrics reports."""

    def __init__(self, model_names: Sequence[str], generator: TextGenerator, speed: int = 1):
        self._model_names = tuple(model_names)
        self._generator = generator
        self._speed = speed

    def __call__(self) -> WorkerStatus:
        return WorkerStatus(self._model_names, self._speed, self._generator.queue_length)
