"""The port through which the controller (and the API, through its own adapter) reach workers.

Every way a worker can fail to answer is a `WorkerUnavailable` (domain.shared.errors)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from vilaserve.domain.shared.worker_status import WorkerStatus


class WorkerGateway(ABC):
    @abstractmethod
    async def get_status(self, worker_address: str, timeout_s: float = 5.0) -> WorkerStatus:
        """The worker's `/worker_get_status`; raises `WorkerUnavailable` (also on a reply that
        is not a status)."""

    @abstractmethod
    def stream_generate(
        self, worker_address: str, payload: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        """The worker's `/worker_generate_stream` frames, each decoded, as they arrive.

        Raises `WorkerUnavailable` when the worker cannot be reached or the stream breaks.
        Closing the iterator early closes the connection, which cancels the generation.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional: only pooled adapters hold anything
        """Releases the connections the gateway holds."""
