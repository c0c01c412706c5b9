"""The port through which a controller reaches its workers, and how that can fail."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from vilaserve.domain.status import WorkerStatus


class WorkerNotResponding(Exception):
    """A worker could not be reached, did not answer in time, or broke its stream off."""

    def __init__(self, worker_address: str, reason: str, timed_out: bool = False) -> None:
        super().__init__(f"worker {worker_address}: {reason}")
        self.worker_address = worker_address
        self.reason = reason
        self.timed_out = timed_out


class WorkerGateway(ABC):
    @abstractmethod
    async def get_status(self, worker_address: str, timeout_s: float = 5.0) -> WorkerStatus:
        """The worker's `/worker_get_status`; raises `WorkerNotResponding` (also on a reply that
        is not a status)."""

    @abstractmethod
    def stream_generate(
        self, worker_address: str, payload: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        """The worker's `/worker_generate_stream` frames, each decoded, as they arrive.

        Raises `WorkerNotResponding` when the worker cannot be reached or the stream breaks.
        Closing the iterator early closes the connection, which cancels the generation.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional: only pooled adapters hold anything
        """Releases the connections the gateway holds."""
