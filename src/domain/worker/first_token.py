"""Where a request's time to first token goes, split into parts that each layer measures.

The vision encoder measures its images (`ImageTimings`), the generator its queue, prefill and
first sampling (`PromptTimings`), the use case its wait for a turn; `FirstTokenParts` puts
them together once per request, under the names the log and /metrics use.
"""

from __future__ import annotations

from dataclasses import dataclass

from vilaserve.domain.shared.generation import PromptTimings

# The parts, in the order a request meets them; the /metrics label values and log keys.
FIRST_TOKEN_PARTS = (
    "queue",
    "image_decode",
    "vision_tower",
    "projector",
    "prefill",
    "first_sample",
)


@dataclass(frozen=True)
class ImageTimings:
    """Seconds a request's images took to become features: bytes to preprocessed tiles (on a
    thread), the vision tower, the projector. A batch that held several requests' images
    gives each the whole batch's tower and projector time (that is what each waited); images
    found in the embedding cache cost nothing here."""

    decode_s: float = 0.0
    tower_s: float = 0.0
    projector_s: float = 0.0


NO_IMAGES = ImageTimings()


@dataclass(frozen=True)
class FirstTokenParts:
    """One request's time to first token, in seconds per part (see `FIRST_TOKEN_PARTS`).

    The parts need not add up to the whole: tokenizing, waiting for the model thread between
    the image decode and the tower, and the event loop's own delays belong to none of them."""

    queue_s: float
    image_decode_s: float
    vision_tower_s: float
    projector_s: float
    prefill_s: float
    first_sample_s: float

    @classmethod
    def of(
        cls, turn_wait_s: float, images: ImageTimings, prompt: PromptTimings | None
    ) -> FirstTokenParts:
        """`turn_wait_s`: the wait for a turn before any work; the generator's own queue (the
        wait for a cache row) is added to it. A generator that measures nothing reports zeros."""
        generated = prompt or PromptTimings()
        return cls(
            queue_s=turn_wait_s + generated.queue_s,
            image_decode_s=images.decode_s,
            vision_tower_s=images.tower_s,
            projector_s=images.projector_s,
            prefill_s=generated.prefill_s,
            first_sample_s=generated.first_sample_s,
        )

    def by_name(self) -> dict[str, float]:
        """Part name (a `FIRST_TOKEN_PARTS` entry) -> seconds."""
        return dict(
            zip(
                FIRST_TOKEN_PARTS,
                (
                    self.queue_s,
                    self.image_decode_s,
                    self.vision_tower_s,
                    self.projector_s,
                    self.prefill_s,
                    self.first_sample_s,
                ),
                strict=True,
            )
        )
