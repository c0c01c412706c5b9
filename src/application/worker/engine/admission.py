"""The worker's one admission queue: every request counted once, from acceptance to its end.

A request is accepted, or refused with `EngineOverloaded`, before anything is done for it. It
then counts as waiting while it waits for its turn to be served (at most `max_in_service`
requests are: FastChat's `--limit-model-concurrency`), its pictures are encoded, its prompt
tokenized and its sequence queued in the engine; as running while its sequence holds a
KV-cache row; and it leaves the count exactly once, however it ends (finished, failed, refused
by the scheduler, abandoned by its client). /worker_get_status (and so the controller's
heartbeats) and the engine's load figures on /metrics read these same two counts.

Counts change on the event loop (an acceptance, a request that ends before the engine has it)
and on the model thread (a sequence that starts or leaves), so they change under one lock, and
the listener hears every change under it: the figures it publishes are never older than the
counts.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from vilaserve.domain.shared.errors import EngineOverloaded
from vilaserve.domain.worker.ports import Admitted

# Hears (running, waiting) after every change, under the admission's lock.
LoadListener = Callable[[int, int], None]


class Place(enum.Enum):
    WAITING = "waiting"  # accepted: pictures, tokenizing, or queued in the engine
    RUNNING = "running"  # its sequence holds a cache row
    GONE = "gone"  # out of the count for good


class Ticket(Admitted):
    """One request's place. The request's side calls `leave()`; the engine's side calls
    `submitted()`, `started()` and `ended()` (see `Admitted.leave` for why a request whose
    sequence the engine holds leaves only when the engine ends it)."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.place = Place.WAITING
        self.held = False  # its sequence is in the engine, which alone ends it

    def leave(self) -> None:
        self.admission._leave(self)

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        gate = self.admission.in_service
        if gate is None:
            yield
            return
        async with gate:
            yield

    def submitted(self) -> None:
        """Its sequence is in the engine, still waiting; from now on `ended()` takes it out."""
        self.admission._hold(self)

    def started(self) -> None:
        """Its sequence holds a cache row."""
        self.admission._move(self, Place.RUNNING)

    def ended(self) -> None:
        """Its sequence left the engine (its cache row, if any, already given back)."""
        self.admission._move(self, Place.GONE)


class Admission:
    """Holds up to `max_requests` requests at once, running and waiting together (None: no
    bound); refuses the next at once, naming the counts."""

    def __init__(
        self,
        max_requests: int | None = None,
        listener: LoadListener | None = None,
        max_in_service: int | None = None,
    ) -> None:
        if max_requests is not None and max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests}")
        if max_in_service is not None and max_in_service < 1:
            raise ValueError(f"max_in_service must be >= 1, got {max_in_service}")
        self.max_requests = max_requests
        # Taken on the event loop by `Ticket.turn` (the requests' side only).
        self.in_service = asyncio.Semaphore(max_in_service) if max_in_service else None
        self._listener = listener
        self._lock = threading.Lock()
        self._running = 0
        self._waiting = 0

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def queue_length(self) -> int:
        with self._lock:  # both counts from the same moment
            return self._running + self._waiting

    def admit(self) -> Ticket:
        with self._lock:
            if self.max_requests is not None and self._running + self._waiting >= (
                self.max_requests
            ):
                raise EngineOverloaded(
                    f"the worker is busy: {self._running} requests running and "
                    f"{self._waiting} waiting (limit {self.max_requests}); retry later"
                )
            ticket = Ticket(self)
            self._waiting += 1
            self._report()
        return ticket

    def claim(self, admitted: Admitted) -> Ticket:
        """The ticket behind a port's `Admitted`: only this admission's own can enter its
        engine, or its counts would not add up."""
        if not isinstance(admitted, Ticket) or admitted.admission is not self:
            raise ValueError("this request was admitted by another generator")
        return admitted

    def report(self) -> None:
        """Tells the listener the counts again (the engine's other figures changed)."""
        with self._lock:
            self._report()

    # ------------------------------------------------------------------ the tickets' moves
    def _leave(self, ticket: Ticket) -> None:
        with self._lock:
            if not ticket.held:
                self._set(ticket, Place.GONE)

    def _hold(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.place is Place.GONE:
                raise ValueError("a request that left the queue cannot enter the engine")
            ticket.held = True

    def _move(self, ticket: Ticket, place: Place) -> None:
        with self._lock:
            ticket.held = True  # whoever starts or ends a sequence holds it
            self._set(ticket, place)

    def _set(self, ticket: Ticket, place: Place) -> None:
        """Moves `ticket` on, to running or gone (the lock held); gone is for good."""
        if ticket.place is Place.GONE or ticket.place is place:
            return
        if ticket.place is Place.RUNNING:
            self._running -= 1
        else:
            self._waiting -= 1
        if place is Place.RUNNING:
            self._running += 1
        ticket.place = place
        self._report()

    def _report(self) -> None:
        if self._listener is not None:
            self._listener(self._running, self._waiting)
