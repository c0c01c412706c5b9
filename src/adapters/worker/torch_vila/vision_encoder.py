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
from vilaserve.adapters.worker.torch_vila.image_cache import ImageEmbeddingCache
from vilaserve.adapters.worker.torch_vila.image_processing import decode_image
from vilaserve.adapters.worker.torch_vila.text_generator import TorchImageFeatures
from vilaserve.adapters.worker.torch_vila.vision_pipeline import VisionPipeline
from vilaserve.domain.shared.errors import InvalidImage
from vilaserve.domain.worker.ports import ImageFeatures, VisionEncoder


class TorchVisionEncoder(VisionEncoder):
    def __init__(
        self,
        pipeline: VisionPipeline,
        executor: ModelExecutor,
        max_image_pixels: int,
        cache: ImageEmbeddingCache | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._executor = executor
        self._max_pixels = max_image_pixels
        self.cache = cache

    @property
    def tokens_per_image(self) -> int:
        return self._pipeline.tokens_per_image

    async def encode(self, images: Sequence[bytes]) -> ImageFeatures:
        """Only images the cache does not hold are decoded and encoded (in one batch)."""
        cache = self.cache
        if cache is None:
            return TorchImageFeatures(await self._encode(images, range(len(images))))
        # Hashing megabytes of image bytes is no work for the event loop.
        keys = await asyncio.to_thread(lambda: [cache.key(data) for data in images])
        found = [cache.get(key) for key in keys]
        missing = [index for index, hit in enumerate(found) if hit is None]
        if missing:
            fresh = await self._encode(images, missing)
            for slot, index in enumerate(missing):
                found[index] = fresh[slot].clone()  # its own copy: a view pins the whole batch
                cache.put(keys[index], found[index])
        return TorchImageFeatures(torch.stack(found))  # type: ignore[arg-type]

    async def _encode(self, images: Sequence[bytes], indices: Sequence[int]) -> torch.Tensor:
        pixels = await asyncio.to_thread(self._pixels, images, indices)
        return await self._executor.run(self._pipeline.encode_pixels, pixels)

    def _pixels(self, images: Sequence[bytes], indices: Sequence[int]) -> torch.Tensor:
        decoded = []
        for index in indices:
            try:
                decoded.append(decode_image(images[index], self._max_pixels))
            except ValueError as exc:
                raise InvalidImage(f"image {index + 1} could not be decoded: {exc}") from exc
        return self._pipeline.preprocess(decoded)
