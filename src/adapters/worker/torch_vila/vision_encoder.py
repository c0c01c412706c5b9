"""The `VisionEncoder` port: image bytes -> projected embeddings for the LLM.

Decoding and resizing (PIL + numpy) run on a worker thread of their own, so they overlap with
generation steps of other requests; only the tower and projector use the model thread, in one
batch for all requests whose images are ready when it gets there. Each request's features say
how long its decode, and the tower and projector of the batch it was in, took.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from vilaserve.adapters.worker.torch_vila.executor import ModelExecutor
from vilaserve.adapters.worker.torch_vila.image_cache import ImageEmbeddingCache
from vilaserve.adapters.worker.torch_vila.image_processing import decode_image, image_pixels
from vilaserve.adapters.worker.torch_vila.model_runner import TorchImageFeatures
from vilaserve.adapters.worker.torch_vila.vision_pipeline import (
    PreparedImage,
    TimedEncoding,
    VisionPipeline,
)
from vilaserve.domain.shared.errors import InvalidImage
from vilaserve.domain.worker.first_token import NO_IMAGES, ImageTimings
from vilaserve.domain.worker.ports import ImageFeatures, VisionEncoder


class TorchVisionEncoder(VisionEncoder):
    def __init__(
        self,
        pipeline: VisionPipeline,
        executor: ModelExecutor,
        max_image_pixels: int,
        cache: ImageEmbeddingCache | None = None,
        max_request_pixels: int | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._executor = executor
        self._max_pixels = max_image_pixels
        self._max_request_pixels = max_request_pixels or 4 * max_image_pixels
        self.cache = cache
        self._lock = threading.Lock()
        self._pending: list[tuple[list[PreparedImage], asyncio.Future[TimedEncoding]]] = []
        self._jobs: set[asyncio.Future[None]] = set()

    @property
    def tokens_per_image(self) -> int:
        return self._pipeline.tokens_per_image

    async def encode(self, images: Sequence[bytes]) -> ImageFeatures:
        """Only images the cache does not hold are decoded and encoded (in one batch). Each
        image also gets a content key, so prompts about one picture share a cached prefix."""
        cache = self.cache
        # NVILA tiles a picture only when it is alone in its request: that is part of its key.
        alone = len(images) == 1
        suffix = f":{alone}" if self._pipeline.mode.depends_on_count else ""
        # Hashing megabytes of image bytes is no work for the event loop.
        keys = await asyncio.to_thread(lambda: [self._key(data) + suffix for data in images])
        if cache is None:
            fresh, timings = await self._encode(images, range(len(images)), alone)
            return TorchImageFeatures(fresh, keys, timings)
        found: list[torch.Tensor | None] = [cache.get(key) for key in keys]
        missing = [index for index, hit in enumerate(found) if hit is None]
        timings = NO_IMAGES  # every picture in the cache: no work done for them
        if missing:
            fresh, timings = await self._encode(images, missing, alone)
            for index, embedding in zip(missing, fresh, strict=True):
                found[index] = embedding
                cache.put(keys[index], embedding)
        return TorchImageFeatures([f for f in found if f is not None], keys, timings)

    def _key(self, data: bytes) -> str:
        if self.cache is not None:
            return self.cache.key(data)
        return hashlib.sha256(data).hexdigest()  # one process, one preprocessing: no salt

    async def _encode(
        self, images: Sequence[bytes], indices: Sequence[int], alone: bool
    ) -> tuple[list[torch.Tensor], ImageTimings]:
        """Encodes on the model thread, batched with whatever other requests queued images
        meanwhile: the first to queue schedules one job, which takes every pending batch."""
        prepared, decode_s = await asyncio.to_thread(self._prepare_timed, images, indices, alone)
        future: asyncio.Future[TimedEncoding] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._pending.append((prepared, future))
            first = len(self._pending) == 1
        if first:
            self._jobs.add(job := asyncio.ensure_future(self._encode_pending()))
            job.add_done_callback(self._jobs.discard)
        encoded = await future
        timings = ImageTimings(decode_s, encoded.tower_s, encoded.projector_s)
        return encoded.embeddings, timings

    async def _encode_pending(self) -> None:
        results = await self._executor.run(self._encode_batch)
        for future, result in results:
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _encode_batch(self) -> list[tuple[asyncio.Future[TimedEncoding], Any]]:
        with self._lock:
            pending, self._pending = self._pending, []
        # Every tile of a model has the same size, so all queued pictures share one tower call.
        try:
            encoded = self._pipeline.encode_timed([item for items, _ in pending for item in items])
        except Exception as exc:
            return [(future, exc) for _, future in pending]
        results: list[tuple[asyncio.Future[TimedEncoding], Any]] = []
        start = 0
        for items, future in pending:
            # One copy per image: a view would pin the whole batch in the cache.
            rows = encoded.embeddings[start : start + len(items)]
            # Each request waited for the whole batch: it is charged with all of it.
            own = TimedEncoding([row.clone() for row in rows], encoded.tower_s, encoded.projector_s)
            results.append((future, own))
            start += len(items)
        return results

    def _prepare_timed(
        self, images: Sequence[bytes], indices: Sequence[int], alone: bool
    ) -> tuple[list[PreparedImage], float]:
        """`_prepare` and its seconds, timed on its own thread (not the wait for one)."""
        started = time.perf_counter()
        prepared = self._prepare(images, indices, alone)
        return prepared, time.perf_counter() - started

    def _prepare(
        self, images: Sequence[bytes], indices: Sequence[int], alone: bool
    ) -> list[PreparedImage]:
        """Checks every header first (the request's pixels in total, each image's), then
        decodes one image at a time straight into the tower's tiles: a request holds one
        full-size picture in memory at most, however many it sends."""
        total = 0
        for index in indices:
            try:
                total += image_pixels(images[index])
            except ValueError as exc:
                raise InvalidImage(f"image {index + 1} could not be decoded: {exc}") from exc
        if total > self._max_request_pixels:
            raise InvalidImage(
                f"the request's images hold {total} pixels in all, more than the limit of "
                f"{self._max_request_pixels} (--max-request-pixels)"
            )
        prepared = []
        for index in indices:
            try:
                decoded = decode_image(images[index], self._max_pixels)
            except ValueError as exc:
                raise InvalidImage(f"image {index + 1} could not be decoded: {exc}") from exc
            prepared.append(self._pipeline.prepare(decoded, alone))
            del decoded
        return prepared
