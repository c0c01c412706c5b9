"""The image embedding cache: a picture asked about again is not encoded again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vilaserve.adapters.offline.checkpoints.tiny_vila import make_png
from vilaserve.adapters.worker.torch_vila.image_cache import ImageEmbeddingCache
from vilaserve.adapters.worker.torch_vila.model_runner import TorchImageFeatures
from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions
from vilaserve.domain.worker.first_token import NO_IMAGES


def test_the_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used() -> None:
    cache = ImageEmbeddingCache(max_bytes=3 * 400, preprocessing="size=32")
    entry = torch.zeros(10, 10)  # 400 bytes
    keys = [cache.key(bytes([i])) for i in range(4)]
    for key in keys[:3]:
        cache.put(key, entry.clone())
    assert cache.get(keys[0]) is not None  # now the most recently used
    cache.put(keys[3], entry.clone())  # evicts keys[1], the least recently used
    assert cache.get(keys[1]) is None and cache.get(keys[2]) is not None
    assert cache.size_bytes == 3 * 400
    cache.put(cache.key(b"huge"), torch.zeros(100, 100))  # larger than the cache: not kept
    assert cache.get(cache.key(b"huge")) is None and cache.size_bytes == 3 * 400
    assert (cache.hits, cache.misses) == (2, 2)
    other = ImageEmbeddingCache(max_bytes=1200, preprocessing="size=64")
    assert other.key(b"\0") != cache.key(b"\0")  # other preprocessing, other entry


@pytest.fixture
def runtime(tiny_vila_siglip: Path) -> Iterator[VilaRuntime]:
    loaded = VilaRuntime.load(VilaRuntimeOptions(model_path=str(tiny_vila_siglip), dtype="float32"))
    yield loaded
    loaded.executor.shutdown()


def test_a_picture_seen_before_is_served_from_the_cache_with_the_same_embeddings(
    runtime: VilaRuntime,
) -> None:
    encoder = runtime.vision_encoder
    assert encoder is not None and encoder.cache is not None
    red, green, blue = (make_png(40, 30, c) for c in ("red", "green", "blue"))

    def encode(images: list[bytes]) -> torch.Tensor:
        features = asyncio.run(encoder.encode(images))
        assert isinstance(features, TorchImageFeatures)
        return features.embeddings

    first = encode([red, green])
    assert (encoder.cache.hits, encoder.cache.misses) == (0, 2)
    second = encode([green, blue])  # green from the cache, blue encoded
    assert (encoder.cache.hits, encoder.cache.misses) == (1, 3)
    assert torch.equal(second[0], first[1])
    cache, encoder.cache = encoder.cache, None  # the same pictures, uncached
    uncached = encode([green, blue])
    encoder.cache = cache
    torch.testing.assert_close(second, uncached, rtol=1e-5, atol=1e-5)


def test_encoding_reports_its_parts_and_a_cached_picture_costs_none(
    runtime: VilaRuntime,
) -> None:
    encoder = runtime.vision_encoder
    assert encoder is not None and encoder.cache is not None
    orange = make_png(36, 28, "orange")
    fresh = asyncio.run(encoder.encode([orange])).timings
    assert fresh.decode_s > 0 and fresh.tower_s > 0 and fresh.projector_s > 0
    assert asyncio.run(encoder.encode([orange])).timings == NO_IMAGES  # from the cache
