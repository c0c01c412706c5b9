"""What a worker reports about itself to controllers and clients."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerStatus:
    model_names: tuple[str, ...]
    speed: float  # a relative weight; workers report 1, a controller the sum of its workers'
    queue_length: int

    def to_dict(self) -> dict[str, object]:
        return {
            "model_names": list(self.model_names),
            "speed": self.speed,
            "queue_length": self.queue_length,
        }


@dataclass(frozen=True)
class ModelDescription:
    """Static facts about the served model that the API server asks for."""

    name: str
    context_length: int
    tokens_per_image: int
    multimodal: bool
    cpu_path: str | None = None  # the kernels that run it (`/model_details`), when known

    def to_dict(self) -> dict[str, object]:
        """The worker's `/model_details` reply (the name is the request's, not repeated)."""
        reply: dict[str, object] = {
            "context_length": self.context_length,
            "tokens_per_image": self.tokens_per_image,
            "multimodal": self.multimodal,
        }
        if self.cpu_path is not None:
            reply["cpu_path"] = self.cpu_path
        return reply
