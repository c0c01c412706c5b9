"""The ports of the OpenAI-compatible API: the controller and remote images. Workers are
reached through the shared `WorkerGateway` (domain.shared.worker_gateway).

Adapters raise the shared "unavailable" family, `ControllerUnavailable` (controller down) and
`WorkerUnavailable` (worker down or silent), and `BadRequest` for an image that cannot be fetched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


class ModelDirectory(ABC):
    """The FastChat-style controller: which models exist, and which worker serves one."""

    @abstractmethod
    async def list_models(self) -> list[str]: ...

    @abstractmethod
    async def worker_address(self, model: str) -> str | None:
        """The address of a worker for `model`, or None when no worker serves it."""

    async def refresh_workers(self) -> None:  # noqa: B027 - optional
        """Asks the controller to check its workers now (FastChat's `/refresh_all_workers`),
        after one it handed out could not be reached: it drops those that do not answer. The
        protocol has no way to name the one that failed."""


@dataclass(frozen=True)
class FetchedImage:
    data: bytes
    media_type: str


class ImageFetcher(ABC):
    """Downloads an image given by an http(s) URL, within the server's policy."""

    @abstractmethod
    async def fetch(self, url: str) -> FetchedImage:
        """Raises `BadRequest` (or `PayloadTooLarge`) saying why the image cannot be used."""
