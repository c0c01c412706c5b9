"""The worker protocol (FastChat / TinyChat) as the port through which the controller and the
API reach model workers.

Every way a worker can fail to answer is a `WorkerUnavailable` (domain.shared.errors)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from vilaserve.domain.shared.worker_status import WorkerStatus

# Ends every JSON frame of a generation stream (FastChat / LLaVA / TinyChat framing).
FRAME_SEPARATOR = b"\0"


@dataclass(frozen=True)
class ModelDetails:
    """A worker's `/model_details`."""

    context_length: int
    multimodal: bool = True
    tokens_per_image: int = 0


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

        A refusal is one error frame (`error_code`), yielded like any other. Raises
        `WorkerUnavailable` when the worker cannot be reached or the stream breaks. Closing the
        iterator early closes the connection, which cancels the generation.
        """

    @abstractmethod
    async def model_details(self, worker_address: str, model: str) -> ModelDetails:
        """`/model_details`, with FastChat's defaults for what a worker leaves out."""

    @abstractmethod
    async def conversation_template(self, worker_address: str, model: str) -> dict[str, Any]:
        """The `conv` object of `/worker_get_conv_template` (FastChat's `Conversation` fields),
        as the worker sent it: which templates it can render is the reader's business."""

    async def aclose(self) -> None:  # noqa: B027 - optional: only pooled adapters hold anything
        """Releases the connections the gateway holds."""
