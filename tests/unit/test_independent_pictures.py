"""The independent evaluation pictures (benchmarks/independent_pictures.py) keep the vocabulary's
semantics: what a question asks is what the picture shows, whether drawn, sketched or
photographed; and demo_accuracy.py reports them per turn, question kind and look."""

from __future__ import annotations

import io
import itertools
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="module")
def plans() -> list[tuple[ip.IndependentScene, ip.Look, list[tuple[str, str, str]]]]:
    """The first 500 pictures of the default seed, planned but not drawn."""
    return [ip.independent_plan(ip.DEFAULT_SEED, index) for index in range(500)]


def _first(plans: list, wanted: Any, start: int = 0) -> int:
    return next(i for i, (s, look, _) in enumerate(plans) if i >= start and wanted(s, look))


def test_the_same_seed_and_index_draw_the_same_picture(
    examples: list[ip.IndependentExample],
    plans: list[tuple[ip.IndependentScene, ip.Look, list[tuple[str, str, str]]]],
) -> None:
    again = ip.independent_example(2026, 3)
    assert again.png == examples[3].png and again.questions == examples[3].questions
    assert ip.independent_example(2027, 3).png != examples[3].png
    # Sketches, handwriting and photographs draw their wobble, grain and camera from
    # (seed, index) too.
    for wanted in (
        lambda s, look: look.sketched and s.kind != "word",
        lambda s, look: look.sketched and s.kind == "word",
        lambda s, look: look.finish == "photographed",
        lambda s, look: look.paper == "textured",
    ):
        index = _first(plans, wanted)
        first, second = ip.independent_example(2026, index), ip.independent_example(2026, index)
        assert first.png == second.png and first.look == second.look
        assert first.png != ip.independent_example(2026, index + 1).png


def test_every_look_occurs_in_the_first_500(
    plans: list[tuple[ip.IndependentScene, ip.Look, list[tuple[str, str, str]]]],
) -> None:
    looks = [look for _, look, _ in plans]
    assert {look.drawing for look in looks} == {"filled", "outlined", "sketched", "typed"}
    assert {look.finish for look in looks} == set(ip.FINISHES)
    assert {look.paper for look in looks} == set(ip.PAPERS)
    assert {look.sketch_fill for look in looks if look.sketched} == {"", "solid", "scribble"}
    assert any(s.kind == "word" and look.sketched for s, look, _ in plans)  # handwriting
    assert any(
        s.kind != "word" and look.sketched and look.finish == "photographed" for s, look, _ in plans
    )
    assert {len(questions) for _, _, questions in plans} == {1, 2, 3}
    aspects = [look.aspect for look in looks]
    assert min(aspects) == 1.0 and max(aspects) > 1.7
    assert any(look.background_style in ip.DARK_BACKGROUNDS for look in looks)
    # The shares the module docstring promises, roughly.
    share = {name: sum(look.finish == name for look in looks) / 500 for name in ip.FINISHES}
    assert 0.2 <= share["photographed"] <= 0.4 and 0.15 <= share["degraded"] <= 0.35
    assert 0.15 <= sum(look.sketched for look in looks) / 500 <= 0.4
    assert all((look.photo is not None) == (look.finish == "photographed") for look in looks)


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
        assert min(picture.size) >= 160 and max(picture.size) <= 320
        assert look.aspect <= ip.MAX_ASPECT + 0.01  # rounded to whole pixels
        assert look.fill in ip.SHADES[scene.colour]
        assert ip._distance(look.fill, look.background) >= ip.MIN_CONTRAST
        if look.background_style in ip.DARK_BACKGROUNDS:
            assert scene.colour != "black" and look.paper == "plain"
            assert ip._luma(look.fill) - ip._luma(look.background) >= ip.MIN_DARK_LUMA_GAP
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
        scene, planned, _ = ip.independent_plan(5, index)
        if scene.kind != "single":
            continue
        look = _crisp(planned)
        pixels = ip._render(look, scene).astype(int)
        ink = np.abs(pixels - np.array(ip._rgb(look.background))).sum(axis=-1) > 60
        ys, xs = np.nonzero(ink)
        (item,) = look.items
        drawn = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        assert abs(drawn - item.extent_px) <= 3, scene
        assert abs((xs.max() + xs.min()) / 2 - item.x) <= 2
        assert abs((ys.max() + ys.min()) / 2 - item.y) <= 2
        checked += 1
    assert checked >= 15


def _crisp(look: ip.Look) -> ip.Look:
    """The planned shapes on plain paper, drawn by machine, neither photographed nor noised."""
    return replace(
        look,
        noise_sigma=0.0,
        blur_radius=0.0,
        jpeg_quality=None,
        photo=None,
        finish="clean",
        paper="plain",
        sketched=False,
        sketch_fill="",
    )


def _ink(pixels: np.ndarray, background: np.ndarray, threshold: int = 60) -> np.ndarray:
    return np.abs(pixels.astype(int) - background.astype(int)).sum(axis=-1) > threshold


def _edge(mask: np.ndarray) -> int:
    """How many pixels of the mask touch a pixel outside it (about its outline's length)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return int((mask & ~inner).sum())


def test_a_sketched_shape_wobbles_inside_its_planned_box(
    plans: list[tuple[ip.IndependentScene, ip.Look, list[tuple[str, str, str]]]],
) -> None:
    """Hand-drawn: not the crisp drawing, but the same box and centre (so size and position
    answers hold), and within the frame."""
    checked = 0
    for index, (scene, look, _) in enumerate(plans):
        if scene.kind != "single" or not look.sketched or checked >= 16:
            continue
        sketch = replace(_crisp(look), sketched=True, sketch_fill=look.sketch_fill)
        background = np.array(ip._rgb(look.background))
        drawn = _ink(ip._render(sketch, scene), background)
        crisp = _ink(ip._render(_crisp(look), scene), background)
        ys, xs = np.nonzero(drawn)
        (item,) = look.items
        extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        assert abs(extent - item.extent_px) <= max(3.0, 0.06 * item.extent_px), index
        assert abs((xs.max() + xs.min()) / 2 - item.x) <= max(2.0, 0.04 * item.extent_px)
        assert abs((ys.max() + ys.min()) / 2 - item.y) <= max(2.0, 0.04 * item.extent_px)
        if item.extent_px >= 60:  # the wobble moves the ink off the crisp shape's edge
            assert (drawn ^ crisp).sum() >= _edge(crisp), index
        checked += 1
    assert checked == 16


def test_a_photographed_shape_stays_in_its_position_and_size(
    plans: list[tuple[ip.IndependentScene, ip.Look, list[tuple[str, str, str]]]],
) -> None:
    """The photograph as shipped (warp, table, light, blur, noise, JPEG) against the same
    photograph of the empty sheet: the ink's centre is nearest its region's centre and its
    extent stays on its size's side."""
    checked = 0
    for index, (scene, look, _) in enumerate(plans):
        if scene.kind != "single" or look.finish != "photographed" or checked >= 10:
            continue
        with_shape = ip.render_png(look, scene, np.random.default_rng([1, index]))
        empty = ip.render_png(replace(look, items=()), scene, np.random.default_rng([1, index]))
        shown = np.asarray(Image.open(io.BytesIO(with_shape)).convert("RGB"))
        sheet = np.asarray(Image.open(io.BytesIO(empty)).convert("RGB"))
        ys, xs = np.nonzero(_ink(shown, sheet))
        cx = (xs.max() + xs.min()) / 2 / look.width
        cy = (ys.max() + ys.min()) / 2 / look.height
        nearest = min(
            ip.REGION_CENTRES,
            key=lambda name: math.dist((cx, cy), ip.REGION_CENTRES[name]),
        )
        assert nearest == scene.position, (index, cx, cy)
        extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / min(
            look.width, look.height
        )
        if scene.size == "small":
            assert extent <= ip.SMALL_EXTENT[1] + 0.02, index
        else:
            assert extent >= ip.BIG_EXTENT[0] - 0.04, index
        # The sheet's own mapping agrees with the pixels.
        (item,) = look.items
        px, py = ip.photo_point(look, item.x, item.y)
        assert abs(px / look.width - cx) <= 0.03 and abs(py / look.height - cy) <= 0.03
        checked += 1
    assert checked == 10


def test_paper_lines_and_grain_are_faint(
    plans: list[tuple[ip.IndependentScene, ip.Look, list[tuple[str, str, str]]]],
) -> None:
    """Paper is seen but never mistaken for a shape: far fainter than any shape's contrast."""
    for paper in ("squared", "lined", "dotted", "textured"):
        index = _first(plans, lambda s, look, paper=paper: look.paper == paper)
        scene, look, _ = plans[index]
        # The sheet alone: no shapes, and a scene with no word to write.
        sheet = ip._render(
            replace(_crisp(look), paper=paper, items=()), replace(scene, kind="group")
        )
        distance = np.linalg.norm(sheet.astype(float) - np.array(ip._rgb(look.background)), axis=-1)
        assert distance.max() <= ip.PAPER_CONTRAST[1] + 8, paper
        assert (distance >= 5).mean() > 0.005, paper  # there is something to see


def test_a_handwritten_word_stays_in_the_frame_at_its_height(
    plans: list[tuple[ip.IndependentScene, ip.Look, list[tuple[str, str, str]]]],
) -> None:
    checked = 0
    for scene, look, _ in plans:
        if scene.kind != "word" or not look.sketched or checked >= 6:
            continue
        written = replace(_crisp(look), sketched=True)
        background = np.array(ip._rgb(look.background))
        ink = _ink(ip._render(written, scene), background)
        typed = _ink(ip._render(_crisp(look), scene), background)
        ys, xs = np.nonzero(ink)
        assert xs.min() >= 1 and ys.min() >= 1
        assert xs.max() <= look.width - 2 and ys.max() <= look.height - 2
        height = (ys.max() - ys.min() + 1) / look.height
        assert 0.18 <= height <= 0.45, scene.word
        assert (ink ^ typed).sum() >= 0.2 * typed.sum()  # not the font's own letters
        checked += 1
    assert checked == 6


def test_the_report_breaks_accuracy_out_per_turn_kind_and_look(
    plans: list[tuple[ip.IndependentScene, ip.Look, list[tuple[str, str, str]]]],
) -> None:
    pytest.importorskip("torch")
    import demo_accuracy

    records = []
    for index, (scene, look, questions) in enumerate(plans[:60]):
        example = ip.IndependentExample(index, b"", scene, look, questions)
        for turn, (kind, _, _) in enumerate(questions, start=1):
            # Right unless photographed or sketched.
            hit = look.finish != "photographed" and look.drawing != "sketched"
            records.append(demo_accuracy.Record(example, turn, kind, hit, True, None))
    summary = demo_accuracy.summarize_independent(records)
    everything = summary["all_turns"]
    assert everything["questions"] == len(records)
    assert everything["accuracy"] == sum(r.hit for r in records) / len(records)
    assert everything["by_finish"]["photographed"] == 0.0
    assert everything["by_drawing"]["sketched"] == 0.0
    outlined = [r for r in records if r.example.look.drawing == "outlined"]
    assert everything["by_drawing"]["outlined"] == sum(r.hit for r in outlined) / len(outlined)
    assert 0.0 < everything["by_finish"]["clean"] < 1.0  # its sketches missed
    colour = [r for r in records if r.kind == "colour"]
    assert everything["by_kind"]["colour"] == sum(r.hit for r in colour) / len(colour)
    for turn in (1, 2, 3):
        entry = summary[f"turn{turn}"]
        assert entry["questions"] == sum(r.turn == turn for r in records)
        assert sum(entry["questions_by_kind"].values()) == entry["questions"]
        assert sum(entry["questions_by_finish"].values()) == entry["questions"]
        assert sum(entry["questions_by_drawing"].values()) == entry["questions"]
    assert summary["turn1_by_degradation"]["photographed"]["accuracy"] == 0.0
    table = demo_accuracy.independent_tables({"16bit": {"label": "16-bit", "independent": summary}})
    lines = table.splitlines()
    assert "| build | turn | all | colour | shape | count | size | position | text |" in lines
    photographed = everything["questions_by_finish"]["photographed"]
    assert any(
        line.startswith("| 16-bit | all |") and line.endswith(f"| 0.0% ({photographed}) |")
        for line in lines
    )


def test_readme_pictures_can_pin_the_scene() -> None:
    png = ip.draw_example_png(
        scene={"kind": "single", "shape": "square", "colour": "yellow", "size": "big"},
        look={
            "background": "#FAF9F6",
            "jpeg_quality": None,
            "noise_sigma": 0.0,
            "blur_radius": 0.0,
            "photo": None,
            "paper": "plain",
        },
    )
    picture = Image.open(io.BytesIO(png)).convert("RGB")
    assert picture.getpixel((1, 1)) == (0xFA, 0xF9, 0xF6)
