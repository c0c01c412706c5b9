"""The independent evaluation pictures (benchmarks/independent_pictures.py) keep the vocabulary's
semantics: what a question asks is what the picture shows."""

from __future__ import annotations

import io
import itertools
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import independent_pictures as ip

from vilaserve.adapters.offline.demo import shapes

ANSWERS = {
    "shape": set(shapes.SHAPES),
    "colour": set(shapes.COLOURS),
    "size": set(shapes.SIZES),
    "position": set(shapes.POSITIONS),
    "count": set(shapes.COUNTS),
    "text": set(shapes.WORDS),
}


@pytest.fixture(scope="module")
def examples() -> list[ip.IndependentExample]:
    return ip.independent_examples(2026, 40)


def test_the_same_seed_and_index_draw_the_same_picture(
    examples: list[ip.IndependentExample],
) -> None:
    again = ip.independent_example(2026, 3)
    assert again.png == examples[3].png and again.questions == examples[3].questions
    assert ip.independent_example(2027, 3).png != examples[3].png


def test_questions_are_of_different_kinds_that_apply_to_the_scene(
    examples: list[ip.IndependentExample],
) -> None:
    kinds = {kind.name: kind for kind in shapes.VOCABULARY}
    for example in examples:
        asked = [kind for kind, _, _ in example.questions]
        assert 1 <= len(asked) <= 3 and len(set(asked)) == len(asked)
        for kind, question, answer in example.questions:
            assert example.scene.kind in kinds[kind].scenes
            assert "{" not in question and question in {
                p.format(shape=example.scene.shape or "", shapes=f"{example.scene.shape}s")
                for p in kinds[kind].phrasings[example.scene.kind]  # type: ignore[index]
            }
            assert answer in ANSWERS[kind]
            assert answer == example.scene.answer(kind)
    assert {e.scene.kind for e in examples} == {"single", "group", "word"}


def test_pictures_have_the_promised_size_colours_and_geometry(
    examples: list[ip.IndependentExample],
) -> None:
    for example in examples:
        look, scene = example.look, example.scene
        picture = Image.open(io.BytesIO(example.png))
        assert picture.size == (look.width, look.height)
        assert min(picture.size) >= 160 and max(picture.size) <= 320 and look.aspect <= 1.6
        assert look.fill in ip.SHADES[scene.colour]
        assert ip._distance(look.fill, look.background) >= ip.MIN_CONTRAST
        if look.background_style in ip.DARK_BACKGROUNDS:
            assert scene.colour != "black"
        short = min(look.width, look.height)
        if scene.kind == "single":
            (item,) = look.items
            extent = item.extent_px / short
            low, high = ip.SMALL_EXTENT if scene.size == "small" else ip.BIG_EXTENT
            assert low <= extent <= high
            if extent > ip.CENTERED_ABOVE:
                assert scene.position == "center"
            fx, fy = ip.REGION_CENTRES[scene.position or ""]
            assert abs(item.x / look.width - fx) <= ip.POSITION_JITTER + 1e-9
            assert abs(item.y / look.height - fy) <= ip.POSITION_JITTER + 1e-9
        elif scene.kind == "group":
            assert len(look.items) == scene.count and 2 <= len(look.items) <= 5
            for first, second in itertools.combinations(look.items, 2):
                gap = math.hypot(first.x - second.x, first.y - second.y)
                assert gap > (first.extent_px + second.extent_px) * 0.71


def test_a_drawn_shape_covers_its_planned_box() -> None:
    """Rendered without noise: the pixels that differ from the background span the planned
    extent and sit at the planned centre, whatever the shape and its rotation."""
    checked = 0
    for index in range(60):
        example = ip.independent_example(5, index)
        if example.scene.kind != "single":
            continue
        look = replace(example.look, noise_sigma=0.0, blur_radius=0.0, jpeg_quality=None)
        pixels = ip._render(look, example.scene).astype(int)
        ink = np.abs(pixels - np.array(ip._rgb(look.background))).sum(axis=-1) > 60
        ys, xs = np.nonzero(ink)
        (item,) = look.items
        drawn = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        assert abs(drawn - item.extent_px) <= 3, example.scene
        assert abs((xs.max() + xs.min()) / 2 - item.x) <= 2
        assert abs((ys.max() + ys.min()) / 2 - item.y) <= 2
        checked += 1
    assert checked >= 15


def test_readme_pictures_can_pin_the_scene() -> None:
    png = ip.draw_example_png(
        scene={"kind": "single", "shape": "square", "colour": "yellow", "size": "big"},
        look={"background": "#FAF9F6", "jpeg_quality": None, "noise_sigma": 0.0},
    )
    picture = Image.open(io.BytesIO(png)).convert("RGB")
    assert picture.getpixel((1, 1)) == (0xFA, 0xF9, 0xF6)
