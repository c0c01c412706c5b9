"""The controller's state: which workers serve which models, who is alive, who gets the next
request.

Pure Python. The clock and the random source are injected, so expiry and the lottery are tested
without sleeping and without luck.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from vilaserve.domain.shared.controller_messages import worker_identity
from vilaserve.domain.shared.worker_status import WorkerStatus

Clock = Callable[[], float]


class RandomSource(Protocol):
    def random(self) -> float:
        """A float in [0, 1)."""


class DispatchMethod(str, Enum):
    """FastChat's `--dispatch-method` values."""

    LOTTERY = "lottery"  # a random worker, weighted by its speed
    SHORTEST_QUEUE = "shortest_queue"  # the worker with the least queue per unit of speed


class ModelKind(str, Enum):
    ALL = "all"
    MULTIMODAL = "multimodal"
    LANGUAGE = "language"


@dataclass
class WorkerRecord:
    address: str  # as the worker spelled it when it registered: where requests go
    model_names: tuple[str, ...]
    speed: float
    queue_length: int
    multimodal: bool
    check_heart_beat: bool  # False: never expires (e.g. a nested controller registered by hand)
    last_heart_beat: float
    last_dispatch: int = 0  # dispatch sequence number; 0 = never chosen

    @property
    def load(self) -> float:
        """Queue per unit of speed; a worker that reports no speed is chosen last."""
        return self.queue_length / self.speed if self.speed > 0 else math.inf


class WorkerRegistry:
    def __init__(
        self,
        expiration_s: float,
        clock: Clock = time.monotonic,
        rng: RandomSource | None = None,
    ) -> None:
        if expiration_s <= 0:
            raise ValueError(f"the heartbeat expiration must be > 0 s, got {expiration_s}")
        self._expiration_s = expiration_s
        self._clock = clock
        self._rng: RandomSource = rng if rng is not None else random.Random()
        # Keyed by `worker_identity`: two spellings of one worker's address are one worker.
        self._workers: dict[str, WorkerRecord] = {}
        self._dispatches = 0

    @property
    def expiration_s(self) -> float:
        return self._expiration_s

    def register(
        self, address: str, status: WorkerStatus, multimodal: bool, check_heart_beat: bool
    ) -> WorkerRecord:
        """Adds the worker, or replaces what was known about it once it expired.

        A live worker registered again (under any spelling of its address) only takes `status`,
        which the caller must have asked the worker itself for: it keeps the address it is
        reached at, `multimodal` and `check_heart_beat`, so whoever can register cannot hide a
        worker from image requests nor exempt it from heartbeats. Returns the record kept."""
        key = worker_identity(address)
        record = self._workers.get(key)
        if record is not None and not self._is_expired(record):
            self._take_status(record, status)
            return record
        record = WorkerRecord(
            address=address,
            model_names=tuple(status.model_names),
            speed=status.speed,
            queue_length=status.queue_length,
            multimodal=multimodal,
            check_heart_beat=check_heart_beat,
            last_heart_beat=self._clock(),
        )
        self._workers[key] = record
        return record

    def live_address(self, address: str) -> str | None:
        """Where the live worker that `address` (any spelling) names is reached; None when
        there is none."""
        record = self._workers.get(worker_identity(address))
        return None if record is None or self._is_expired(record) else record.address

    def heartbeat(self, address: str, queue_length: int) -> bool:
        """Records a heartbeat; False when the worker is unknown (or expired) and must register."""
        key = worker_identity(address)
        record = self._workers.get(key)
        if record is None:
            return False
        if self._is_expired(record):
            del self._workers[key]
            return False
        record.queue_length = queue_length
        record.last_heart_beat = self._clock()
        return True

    def update_status(self, address: str, status: WorkerStatus) -> bool:
        """Fresh facts from the worker itself (it answered, so it is alive)."""
        record = self._workers.get(worker_identity(address))
        if record is None:
            return False
        self._take_status(record, status)
        return True

    def is_registered(self, address: str) -> bool:
        return worker_identity(address) in self._workers

    def remove(self, address: str) -> bool:
        return self._workers.pop(worker_identity(address), None) is not None

    def expire(self) -> list[WorkerRecord]:
        """Removes and returns the workers whose last heartbeat is older than the expiration."""
        gone = {key: r for key, r in self._workers.items() if self._is_expired(r)}
        for key in gone:
            del self._workers[key]
        return list(gone.values())

    def addresses(self) -> list[str]:
        """Every registered worker, expired or not (what a refresh should re-check)."""
        return [record.address for record in self._workers.values()]

    def live_workers(self) -> list[WorkerRecord]:
        return [r for r in self._workers.values() if not self._is_expired(r)]

    def model_names(self, kind: ModelKind = ModelKind.ALL) -> list[str]:
        names: set[str] = set()
        for record in self.live_workers():
            if kind is ModelKind.ALL or record.multimodal == (kind is ModelKind.MULTIMODAL):
                names.update(record.model_names)
        return sorted(names)

    def pick(self, model: str, method: DispatchMethod) -> str | None:
        """The address of the worker that should serve the next request for `model`, if any.

        `shortest_queue` counts the pick against the worker's queue until its next heartbeat
        reports the real length, as FastChat does; ties go to the worker chosen least recently,
        so idle workers take turns.
        """
        candidates = [r for r in self.live_workers() if model in r.model_names]
        if not candidates:
            return None
        if method is DispatchMethod.LOTTERY:
            chosen = self._draw(candidates)
        else:
            chosen = min(candidates, key=lambda r: (r.load, r.last_dispatch))
            chosen.queue_length += 1
        self._dispatches += 1
        chosen.last_dispatch = self._dispatches
        return chosen.address

    def aggregate_status(self) -> WorkerStatus:
        """All live workers as one: lets this controller register as a worker of another."""
        live = self.live_workers()
        return WorkerStatus(
            model_names=tuple(self.model_names()),
            speed=sum(r.speed for r in live),
            queue_length=sum(r.queue_length for r in live),
        )

    def _draw(self, candidates: list[WorkerRecord]) -> WorkerRecord:
        weights = [max(r.speed, 0.0) for r in candidates]
        total = sum(weights)
        if total <= 0:  # nobody reports a speed: all equally likely
            weights, total = [1.0] * len(candidates), float(len(candidates))
        point = self._rng.random() * total
        for record, weight in zip(candidates, weights, strict=True):
            point -= weight
            if point < 0:
                return record
        return candidates[-1]  # float rounding left `point` a hair above zero

    def _take_status(self, record: WorkerRecord, status: WorkerStatus) -> None:
        record.model_names = tuple(status.model_names)
        record.speed = status.speed
        record.queue_length = status.queue_length
        record.last_heart_beat = self._clock()

    def _is_expired(self, record: WorkerRecord) -> bool:
        if not record.check_heart_beat:
            return False
        return self._clock() - record.last_heart_beat > self._expiration_s
