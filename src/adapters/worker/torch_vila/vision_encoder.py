"""The `VisionEncoder` port: image bytes -> projected embeddings for the LLM.

Decoding and resizing run on a worker thread of their own (they need no model), so they
overlap with generation steps of other requests; only the tower and projector use the
model thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import torch

from vilaserve.adapters.worker.torch_vila.executor import ModelExecutor
from vilaserve.adapters.worker.torch_vila.image_processing import decode_image
from vilaserve.adapters.worker.torch_vila.text_generator import TorchImageFeatures
from vilaserve.adapters.worker.torch_vila.vision_pipeline import VisionPipeline
from vilaserve.domain.shared.errors import InvalidImage
from vilaserve.domain.worker.ports import ImageFeatures, VisionEncoder


class TorchVisionEncoder(VisionEncoder):
    def __init__(
        self, pipeline: VisionPipeline, executor: ModelExecutor, max_image_pixels: int
    ) -> None:
        self._pipeline = pipeline
        self._executor = executor
        self._max_pixels = max_image_pixels

    @property
    def tokens_per_image(self) -> int:
        return self._pipeline.tokens_per_image

    async def encode(self, images: Sequence[bytes]) -> ImageFeatures:
        pixels = await asyncio.to_thread(self._pixels, images)
        embeddings = await self._executor.run(self._pipeline.encode_pixels, pixels)
        return TorchImageFeatures(embeddings)

    def _pixels(self, images: Sequence[bytes]) -> torch.Tensor:
        decoded = []
        for index, data in enumerate(images):
            try:
                decoded.append(decode_image(data, self._max_pixels))
            except ValueError as exc:
                raise InvalidImage(f"image {index + 1} could not be decoded: {exc}") from exc
        return self._pipeline.preprocess(decoded)
