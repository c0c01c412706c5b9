"""A request's pictures cost bounded memory and time: every header is checked before anything
is decoded, and pictures are decoded one at a time into the tower's input size."""

from __future__ import annotations

import asyncio
import io
import time
import weakref
from pathlib import Path

import pytest
from PIL import Image

from vilaserve.adapters.worker.torch_vila import vision_encoder as vision_module
from vilaserve.adapters.worker.torch_vila.runtime import VilaRuntime, VilaRuntimeOptions
from vilaserve.domain.shared.errors import InvalidImage


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def runtime(tiny_vila_siglip: Path) -> VilaRuntime:
    return VilaRuntime.load(
        VilaRuntimeOptions(
            model_path=str(tiny_vila_siglip),
            dtype="float32",
            max_image_pixels=64_000_000,
            max_request_pixels=100_000_000,
            image_cache_mb=0,
        )
    )


def test_sixteen_huge_single_colour_pictures_are_refused_before_decoding(
    runtime: VilaRuntime,
) -> None:
    bomb = png(8000, 8000)  # 64M pixels in a few hundred kB
    assert len(bomb) < 2_000_000
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match="1024000000 pixels in all"):
        asyncio.run(runtime.vision_encoder.encode([bomb] * 16))  # type: ignore[union-attr]
    assert time.perf_counter() - started < 2.0  # headers only: nothing was decoded


def test_pictures_are_decoded_one_at_a_time(
    runtime: VilaRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    alive: set[int] = set()
    most = 0
    original = vision_module.decode_image

    def counting(data: bytes, max_pixels: int) -> Image.Image:
        nonlocal most
        image = original(data, max_pixels)
        key = id(image)
        alive.add(key)
        weakref.finalize(image, alive.discard, key)
        most = max(most, len(alive))
        return image

    monkeypatch.setattr(vision_module, "decode_image", counting)
    pictures = [png(2000 + i, 1500) for i in range(4)]
    features = asyncio.run(runtime.vision_encoder.encode(pictures))  # type: ignore[union-attr]
    assert features.num_images == 4
    assert most == 1  # a full-size picture is gone before the next one is decoded
