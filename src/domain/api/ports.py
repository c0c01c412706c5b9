"""The ports of the OpenAI-compatible API: the controller, the workers, remote images.

Adapters raise the shared "unavailable" family, `ControllerUnavailable` (controller down) and
`WorkerUnavailable` (worker down or silent), and `BadRequest` for an image that cannot be fetched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from vilaserve.domain.shared.conversation import ConversationTemplate
from vilaserve.domain.shared.generation import StreamChunk


@dataclass(frozen=True)
class ModelDetails:
    """A worker's `/model_details`."""

    context_length: int
    multimodal: bool = True
    tokens_per_image: int = 0


class ModelDirectory(ABC):
    """The FastChat-style controller: which models exist, and which worker serves one."""

    @abstractmethod
    async def list_models(self) -> list[str]: ...

    @abstractmethod
    async def worker_address(self, model: str) -> str | None:
        """The address of a worker for `model`, or None when no worker serves it."""

    async def report_unreachable(self, address: str) -> None:  # noqa: B027 - optional
        """Tells the controller a worker it handed out cannot be reached, so that it checks
        its workers (FastChat's `/refresh_all_workers`) and stops handing that one out."""


class WorkerApi(ABC):
    """The FastChat worker protocol as the API uses it."""

    @abstractmethod
    async def model_details(self, address: str, model: str) -> ModelDetails: ...

    @abstractmethod
    async def conversation_template(self, address: str, model: str) -> ConversationTemplate: ...

    @abstractmethod
    def generate_stream(self, address: str, payload: dict[str, Any]) -> AsyncIterator[StreamChunk]:
        """`/worker_generate_stream` chunks (cumulative text). A refusal is one error chunk."""


@dataclass(frozen=True)
class FetchedImage:
    data: bytes
    media_type: str


class ImageFetcher(ABC):
    """Downloads an image given by an http(s) URL, within the server's policy."""

    @abstractmethod
    async def fetch(self, url: str) -> FetchedImage:
        """Raises `BadRequest` (or `PayloadTooLarge`) saying why the image cannot be used."""
