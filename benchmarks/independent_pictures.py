"""Pictures for the demo model drawn the way people draw them, independently of its generator.

The demo's training and held-out pictures come from `shapes.py`'s own PIL drawing, muted
backgrounds and colour values; a model can score well on them by learning those. This set is
drawn by other code (matplotlib patches and text on an Agg canvas), with other colour values
(CSS / X11 and matplotlib `tab:` shades, several per colour name), on backgrounds people use
(white, off-white, light grey, pastels; sometimes navy or charcoal), at other sizes (160-320
px a side, aspect up to 1.6), with filled and outlined shapes at any rotation, and with a
share of pictures noised, blurred or JPEG-compressed as a photographed or re-shared picture
is. Only the world's names, question phrasings and answer semantics come from `shapes.py`
(`VOCABULARY`, `SHAPES`, `COLOURS`' names, `WORDS`, ...), none of its drawing.

Scene semantics (the training generator uses the same):

* `single`: one shape. Its extent (bounding size over the shorter image side) is 0.08-0.25
  when `small`, 0.45-0.9 when `big`; its centre is within 0.05 of the frame of its region's
  centre (left 0.25/0.5, right 0.75/0.5, top 0.5/0.25, bottom 0.5/0.75, center 0.5/0.5); a big
  shape wider than 0.55 is always at the center.
* `group`: 2-5 shapes of one kind and one colour, each 0.12-0.25 across, well apart.
* `word`: one word of `WORDS`, its letters 25-38 % of the picture's height, inside the frame.

Each picture comes with up to three questions of different kinds that apply to its scene:
the first is asked alone (turn 1), the others as follow-ups in the same chat.

    python benchmarks/independent_pictures.py --out /tmp/independent --n 12   # for eyeballing
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Circle, Patch, Polygon, Rectangle, RegularPolygon
from matplotlib.textpath import TextPath
from PIL import Image, ImageFilter

from vilaserve.adapters.offline.demo.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    VOCABULARY,
    WORDS,
)

DEFAULT_SEED = 2026
COLOUR_NAMES = tuple(COLOURS)  # the names only; the values below are this module's own

# Shades a person would pick for each name: pure web colours, CSS / X11 names, matplotlib's
# `tab:` palette and a few common design-tool values.
SHADES: dict[str, tuple[str, ...]] = {
    "red": ("#FF0000", "#D62728", "#C00000", "#DC143C", "#E6194B", "#B22222"),
    "green": ("#008000", "#2CA02C", "#00C000", "#32CD32", "#228B22", "#3CB44B"),
    "blue": ("#0000FF", "#1F77B4", "#4169E1", "#000080", "#0000CD", "#1E90FF"),
    "yellow": ("#FFFF00", "#FFD700", "#FFE119", "#FFEB3B", "#F5D800"),
    "orange": ("#FFA500", "#FF7F0E", "#FF8C00", "#F58231", "#FF6F00"),
    "purple": ("#800080", "#9467BD", "#7B2FBE", "#8E44AD", "#6A0DAD", "#911EB4"),
    "black": ("#000000", "#222222", "#111111", "#1A1A1A"),
    "white": ("#FFFFFF", "#F8F8F8", "#FAFAFA", "#F0F0F0"),
}
LIGHT_BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "white": ("#FFFFFF",),
    "off-white": ("#FAF9F6", "#FFFDF5", "#F5F5F0", "#FDF6E3", "#FAF0E6", "#FFFAF0"),
    "light grey": ("#EEEEEE", "#E0E0E0", "#D3D3D3", "#F0F0F0", "#DCDCDC", "#E5E5E5"),
    "pastel": ("#E6F0FA", "#FDE2E4", "#E2F0CB", "#FFF5CC", "#EDE7F6", "#FFE5CC", "#D8F3F0"),
}
DARK_BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "navy": ("#1B2A49", "#0B1D3A", "#14213D", "#102A43"),
    "charcoal": ("#333333", "#2B2B2B", "#36454F", "#222831"),
}
# Shape and background closer than this (Euclidean, RGB 0-255) is redrawn: nobody draws a
# shape that cannot be seen.
MIN_CONTRAST = 110.0

SCENE_WEIGHTS = {"single": 0.45, "group": 0.30, "word": 0.25}
REGION_CENTRES = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
SMALL_EXTENT = (0.08, 0.25)
BIG_EXTENT = (0.45, 0.9)
CENTERED_ABOVE = 0.55  # a big shape wider than this is always at the center
GROUP_EXTENT = (0.12, 0.25)
WORD_HEIGHT = (0.25, 0.38)
POSITION_JITTER = 0.05
OUTLINE_SHARE = 0.25
_DPI = 72  # one point is one pixel: font sizes and line widths are given in pixels

QUESTION_KINDS = {kind.name: kind for kind in VOCABULARY}


@dataclass(frozen=True)
class IndependentScene:
    """What a picture shows, in the vocabulary's terms; fields a kind lacks are None."""

    kind: str  # single / group / word
    colour: str
    shape: str | None = None
    count: int | None = None
    size: str | None = None
    position: str | None = None
    word: str | None = None

    def answer(self, question_kind: str) -> str:
        value = {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "position": self.position,
            "count": self.count,
            "text": self.word,
        }.get(question_kind)
        if value is None:
            raise ValueError(f"question kind {question_kind!r} does not apply to {self}")
        return str(value)

    def question_kinds(self) -> list[str]:
        """The vocabulary's question kinds that apply to this scene, in its order."""
        return [kind.name for kind in VOCABULARY if self.kind in kind.scenes]


@dataclass(frozen=True)
class Item:
    """One drawn shape: centre and bounding size in pixels, rotation in degrees."""

    x: float
    y: float
    extent_px: float
    rotation: float
    variant: str = ""  # triangle: equilateral / right / isosceles
    ratio: float = 0.0  # rectangle: long/short side; isosceles: apex angle (deg); star: inner


@dataclass(frozen=True)
class Look:
    """How the picture is drawn (for eyeballing and for per-style figures)."""

    width: int
    height: int
    background: str  # hex
    background_style: str  # white / off-white / light grey / pastel / navy / charcoal
    fill: str  # hex of the shape's or word's colour
    outline: bool = False
    line_px: float = 0.0
    items: tuple[Item, ...] = ()
    word_px: float = 0.0  # word: ink height in pixels
    word_xy: tuple[float, float] = (0.0, 0.0)  # word: ink box centre
    bold: bool = False
    noise_sigma: float = 0.0
    blur_radius: float = 0.0
    jpeg_quality: int | None = None

    @property
    def aspect(self) -> float:
        return max(self.width, self.height) / min(self.width, self.height)


@dataclass(frozen=True)
class IndependentExample:
    index: int
    png: bytes
    scene: IndependentScene
    look: Look
    # (kind, question, answer): 1-3 of different kinds; the first is the turn-1 question.
    questions: list[tuple[str, str, str]] = field(default_factory=list)


def independent_examples(seed: int = DEFAULT_SEED, n: int = 500) -> list[IndependentExample]:
    """The first `n` pictures for `seed`; each is a function of (seed, index) alone."""
    return [independent_example(seed, index) for index in range(n)]


def independent_example(seed: int, index: int) -> IndependentExample:
    rng = random.Random(f"vilaserve-independent/{seed}/{index}")
    scene, look = plan_picture(rng)
    questions = pick_questions(rng, scene)
    noise = np.random.default_rng([seed, index])
    return IndependentExample(index, render_png(look, scene, noise), scene, look, questions)


def draw_example_png(
    *,
    seed: int = 0,
    scene: dict[str, Any] | None = None,
    look: dict[str, Any] | None = None,
) -> bytes:
    """One picture with some of its choices fixed, for the README, e.g.
    `draw_example_png(scene={"kind": "single", "shape": "square", "colour": "yellow",
    "size": "big", "position": "center"}, look={"background": "#FAF9F6"})`: the rest is
    drawn from `seed`. `look` keys override `Look` fields after planning (no checks)."""
    rng = random.Random(f"vilaserve-independent/example/{seed}")
    fixed = dict(scene or {})
    planned_scene, planned_look = plan_picture(rng, fixed)
    if look:
        planned_look = replace(planned_look, **look)
    return render_png(planned_look, planned_scene, np.random.default_rng([seed]))


# --- planning ---------------------------------------------------------------------------------


def plan_picture(
    rng: random.Random, fixed: dict[str, Any] | None = None
) -> tuple[IndependentScene, Look]:
    """Draws the scene and everything about how it looks; `fixed` pins scene fields."""
    fixed = fixed or {}
    kind = fixed.get("kind") or rng.choices(list(SCENE_WEIGHTS), list(SCENE_WEIGHTS.values()))[0]
    colour = fixed.get("colour") or rng.choice(COLOUR_NAMES)
    width, height = _picture_size(rng)
    background_style, background, fill = _colours(rng, colour)
    look = Look(width, height, background, background_style, fill)
    if kind == "word":
        word = fixed.get("word") or rng.choice(WORDS)
        look = replace(look, **_plan_word(rng, word, width, height))
        scene = IndependentScene("word", colour, word=word)
    else:
        shape = fixed.get("shape") or rng.choice(SHAPES)
        if kind == "single":
            size = fixed.get("size") or rng.choice(SIZES)
            items, position = _plan_single(rng, shape, size, fixed.get("position"), width, height)
            scene = IndependentScene(
                "single", colour, shape=shape, count=1, size=size, position=position
            )
        else:
            count = fixed.get("count") or rng.randint(2, 5)
            items = _plan_group(rng, shape, count, width, height)
            scene = IndependentScene("group", colour, shape=shape, count=count)
        outline = rng.random() < OUTLINE_SHARE
        line_px = 0.0
        if outline:
            smallest = min(item.extent_px for item in items)
            line_px = max(1.5, smallest * rng.uniform(0.03, 0.08))
        look = replace(look, items=tuple(items), outline=outline, line_px=line_px)
    look = replace(look, **_degradation(rng))
    return scene, look


def pick_questions(rng: random.Random, scene: IndependentScene) -> list[tuple[str, str, str]]:
    """Up to three questions of different kinds that apply to the scene, in asking order."""
    kinds = scene.question_kinds()
    rng.shuffle(kinds)
    shape = scene.shape or ""
    questions = []
    for name in kinds[:3]:
        phrasing = rng.choice(QUESTION_KINDS[name].phrasings[scene.kind])  # type: ignore[index]
        question = phrasing.format(shape=shape, shapes=shape + "s" if shape else "")
        questions.append((name, question, scene.answer(name)))
    return questions


def _picture_size(rng: random.Random) -> tuple[int, int]:
    if rng.random() < 0.35:
        side = rng.randint(160, 320)
        return side, side
    while True:
        width, height = rng.randint(160, 320), rng.randint(160, 320)
        if max(width, height) <= 1.6 * min(width, height):
            return width, height


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    value = hex_colour.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def _distance(first: str, second: str) -> float:
    return math.dist(_rgb(first), _rgb(second))


def _colours(rng: random.Random, colour: str) -> tuple[str, str, str]:
    """(background style, background, fill): a plain light background mostly, a dark one
    sometimes (never under black), redrawn until the shape stands out."""
    while True:
        fill = rng.choice(SHADES[colour])
        dark = colour != "black" and (colour == "white" or rng.random() < 0.15)
        styles = DARK_BACKGROUNDS if dark else LIGHT_BACKGROUNDS
        weights = (1, 1) if dark else (3, 3, 2, 2)  # white, off-white, light grey, pastel
        style = rng.choices(list(styles), weights)[0]
        background = rng.choice(styles[style])
        if _distance(fill, background) >= MIN_CONTRAST:
            return style, background, fill


def _rotation(rng: random.Random, shape: str) -> float:
    if shape == "circle":
        return 0.0
    roll = rng.random()
    if roll < 0.45:
        return rng.choice((0.0, 90.0, 180.0, 270.0))  # as drawn by default
    if shape == "square" and roll < 0.6:
        return 45.0  # a diamond
    return rng.uniform(0.0, 360.0)


def _item(rng: random.Random, shape: str, x: float, y: float, extent_px: float) -> Item:
    rotation = _rotation(rng, shape)
    if shape == "rectangle":
        return Item(x, y, extent_px, rotation, ratio=rng.uniform(1.8, 3.0))
    if shape == "triangle":
        variant = rng.choices(("equilateral", "right", "isosceles"), (0.7, 0.15, 0.15))[0]
        apex = rng.uniform(35.0, 50.0) if rng.random() < 0.5 else rng.uniform(72.0, 100.0)
        return Item(x, y, extent_px, rotation, variant, apex if variant == "isosceles" else 0.0)
    if shape == "star":
        return Item(x, y, extent_px, rotation, ratio=rng.uniform(0.38, 0.5))
    return Item(x, y, extent_px, rotation)


def _plan_single(
    rng: random.Random,
    shape: str,
    size: str,
    position: str | None,
    width: int,
    height: int,
) -> tuple[list[Item], str]:
    short = min(width, height)
    while True:
        low, high = SMALL_EXTENT if size == "small" else BIG_EXTENT
        extent = rng.uniform(low, high)
        where = position or rng.choice(POSITIONS)
        if size == "big" and extent > CENTERED_ABOVE:
            if position not in (None, "center"):
                continue  # a pinned off-centre big shape: draw a smaller one
            where = "center"
        fx, fy = REGION_CENTRES[where]
        fx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        fy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        item = _item(rng, shape, fx * width, fy * height, extent * short)
        left, top, right, bottom = _bounds(shape, item, 0.0)
        if left >= 1 and top >= 1 and right <= width - 1 and bottom <= height - 1:
            return [item], where


def _plan_group(rng: random.Random, shape: str, count: int, width: int, height: int) -> list[Item]:
    short = min(width, height)
    items: list[Item] = []
    tries = 0
    while len(items) < count:
        tries += 1
        if tries > 400:  # crowded: start over
            items, tries = [], 0
        extent = rng.uniform(*GROUP_EXTENT) * short
        item = _item(rng, shape, rng.uniform(0, width), rng.uniform(0, height), extent)
        left, top, right, bottom = _bounds(shape, item, 0.0)
        margin = 0.03 * short
        if left < margin or top < margin or right > width - margin or bottom > height - margin:
            continue
        # Well apart: bounding circles (half the box's diagonal) with a gap between them.
        reach = extent * 0.71
        if all(
            math.hypot(item.x - o.x, item.y - o.y) > reach + o.extent_px * 0.71 + 0.06 * short
            for o in items
        ):
            items.append(item)
    return items


def _plan_word(rng: random.Random, word: str, width: int, height: int) -> dict[str, Any]:
    bold = rng.random() < 0.4
    ink = _word_ink(word, 100.0, bold)  # (x0, y0, x1, y1) at font size 100
    target = rng.uniform(*WORD_HEIGHT) * height
    font_scale = target / (ink[3] - ink[1])
    ink_width = (ink[2] - ink[0]) * font_scale
    if ink_width > 0.9 * width:  # a long word in a narrow picture: smaller, still readable
        font_scale *= 0.9 * width / ink_width
        ink_width = 0.9 * width
    ink_height = (ink[3] - ink[1]) * font_scale
    margin_x, margin_y = 0.04 * width, 0.04 * height
    x = rng.uniform(margin_x + ink_width / 2, max(width - margin_x - ink_width / 2, width / 2))
    y = rng.uniform(margin_y + ink_height / 2, max(height - margin_y - ink_height / 2, height / 2))
    return {"word_px": 100.0 * font_scale, "word_xy": (x, y), "bold": bold}


def _degradation(rng: random.Random) -> dict[str, Any]:
    """About a third noised as a photo is, a fifth a little blurred, a third JPEG-compressed."""
    return {
        "noise_sigma": rng.uniform(3.0, 12.0) if rng.random() < 0.3 else 0.0,
        "blur_radius": rng.uniform(0.4, 1.2) if rng.random() < 0.2 else 0.0,
        "jpeg_quality": rng.randint(30, 90) if rng.random() < 0.35 else None,
    }


# --- geometry ---------------------------------------------------------------------------------


def _unit_outline(shape: str, item: Item) -> np.ndarray:
    """The polygon of a shape about 1 across, centred on its box, not yet rotated."""
    if shape == "square":
        return np.array([(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)])
    if shape == "rectangle":
        half = 0.5 / item.ratio
        return np.array([(-0.5, -half), (0.5, -half), (0.5, half), (-0.5, half)])
    if shape == "triangle":
        if item.variant == "right":
            points = np.array([(0.0, 0.0), (1.0, 0.0), (0.0, 0.75)])
        elif item.variant == "isosceles":
            half_base = math.tan(math.radians(item.ratio / 2))
            points = np.array([(-half_base, 0.0), (half_base, 0.0), (0.0, 1.0)])
        else:  # matplotlib's own unit triangle (RegularPolygon's path), radius 1
            angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
            points = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        return points
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, item.ratio)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    raise ValueError(f"not a polygon: {shape!r}")


def _placed(shape: str, item: Item, line_px: float) -> tuple[np.ndarray, float, np.ndarray]:
    """(polygon in pixels, scale, offset): rotated, scaled so that its box plus the line is
    `extent_px` across, its box centred on the item's centre."""
    theta = math.radians(item.rotation)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    turned = _unit_outline(shape, item) @ rotation.T
    low, high = turned.min(axis=0), turned.max(axis=0)
    scale = max(item.extent_px - line_px, 1.0) / float((high - low).max())
    offset = np.array([item.x, item.y]) - (low + high) / 2 * scale
    return turned * scale + offset, scale, offset


def _bounds(shape: str, item: Item, line_px: float) -> tuple[float, float, float, float]:
    if shape == "circle":
        r = item.extent_px / 2
        return item.x - r, item.y - r, item.x + r, item.y + r
    points, _, _ = _placed(shape, item, line_px)
    half = line_px / 2
    (left, top), (right, bottom) = points.min(axis=0) - half, points.max(axis=0) + half
    return float(left), float(top), float(right), float(bottom)


def _patch(shape: str, item: Item, look: Look) -> Patch:
    style: dict[str, Any] = {"joinstyle": "round", "antialiased": True}
    if look.outline:
        style |= {"fill": False, "edgecolor": look.fill, "linewidth": look.line_px}
    else:
        style |= {"facecolor": look.fill, "edgecolor": "none", "linewidth": 0}
    line = look.line_px if look.outline else 0.0
    if shape == "circle":
        return Circle((item.x, item.y), radius=(item.extent_px - line) / 2, **style)
    points, scale, offset = _placed(shape, item, line)
    if shape in ("square", "rectangle"):
        # Rectangle rotates about its own centre, which is the box centre here.
        unit = _unit_outline(shape, item)
        side_x, side_y = (unit.max(axis=0) - unit.min(axis=0)) * scale
        return Rectangle(
            (item.x - side_x / 2, item.y - side_y / 2),
            side_x,
            side_y,
            angle=item.rotation,
            rotation_point="center",
            **style,
        )
    if shape == "triangle" and item.variant == "equilateral":
        # RegularPolygon's centre is the circumcentre: where the unit outline's origin went.
        return RegularPolygon(
            (float(offset[0]), float(offset[1])),
            3,
            radius=scale,
            orientation=math.radians(item.rotation),
            **style,
        )
    return Polygon(points, closed=True, **style)


def _font(bold: bool) -> FontProperties:
    return FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal")


def _word_ink(word: str, size: float, bold: bool) -> tuple[float, float, float, float]:
    """The word's ink box at font size `size`, relative to its baseline origin, y up."""
    extents = TextPath((0, 0), word, size=size, prop=_font(bold)).get_extents()
    return extents.x0, extents.y0, extents.x1, extents.y1


# --- rendering --------------------------------------------------------------------------------


def render_png(look: Look, scene: IndependentScene, noise: np.random.Generator) -> bytes:
    pixels = _render(look, scene)
    picture = Image.fromarray(pixels, "RGB")
    if look.blur_radius:
        picture = picture.filter(ImageFilter.GaussianBlur(look.blur_radius))
    if look.noise_sigma:
        noisy = np.asarray(picture, dtype=np.float32)
        noisy += noise.normal(0.0, look.noise_sigma, noisy.shape).astype(np.float32)
        picture = Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), "RGB")
    if look.jpeg_quality is not None:
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=look.jpeg_quality)
        picture = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _render(look: Look, scene: IndependentScene) -> np.ndarray:
    """The clean picture (height x width x RGB uint8), y pointing down as in the image."""
    width, height = look.width, look.height
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor=look.background)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)  # pixel coordinates: the origin at the top left
    axes.set_axis_off()
    axes.set_facecolor(look.background)
    if scene.kind == "word":
        word = scene.word or ""
        x0, y0, x1, y1 = _word_ink(word, look.word_px, look.bold)
        cx, cy = look.word_xy
        # The baseline origin that puts the ink box's centre at (cx, cy); y is flipped.
        axes.text(
            cx - (x0 + x1) / 2,
            cy + (y0 + y1) / 2,
            word,
            fontsize=look.word_px,
            fontproperties=_font(look.bold),
            color=look.fill,
            ha="left",
            va="baseline",
        )
    else:
        for item in look.items:
            axes.add_patch(_patch(scene.shape or "", item, look))
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[:, :, :3].copy()
    if pixels.shape[:2] != (height, width):  # never seen; keeps the promised size regardless
        pixels = np.asarray(Image.fromarray(pixels).resize((width, height)))
    return pixels


# --- eyeballing -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for PNGs + questions")
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    listing = []
    for example in independent_examples(args.seed, args.n):
        name = f"independent_{args.seed}_{example.index:04d}.png"
        (args.out / name).write_bytes(example.png)
        listing.append(
            {
                "file": name,
                "scene": asdict(example.scene),
                "look": asdict(example.look),
                "questions": [
                    {"kind": kind, "question": question, "answer": answer}
                    for kind, question, answer in example.questions
                ],
            }
        )
    (args.out / "questions.json").write_text(json.dumps(listing, indent=2) + "\n")
    print(f"{len(listing)} pictures and questions.json in {args.out}")


if __name__ == "__main__":
    main()
