"""Pictures for the demo model drawn the way people draw them, independently of its generator.

The demo's training and held-out pictures come from the project's own generators
(`src/adapters/offline/demo/shapes.py`, `everyday.py`); a model can score well on them by
learning their drawing. This set is drawn by other code, this file alone (matplotlib patches,
paths and text on an Agg canvas, then numpy / PIL for the camera), with other colour values
(CSS / X11 and matplotlib `tab:` shades, several per colour name). Only the world's names,
question phrasings and answer semantics come from `shapes.py` (`VOCABULARY`, `SHAPES`,
`COLOURS`' names, `WORDS`, ...), none of its drawing. Set version 2 (`INDEPENDENT_SET_VERSION`;
version 1 had no paper, sketches or photographs).

What varies, and in what shares (over the 500 pictures of the default seed, about):

* picture size 160-320 px a side: a third square, a third a common aspect (4:3, 3:2, 5:4,
  16:9, either way up), a third any aspect up to 1.6;
* background: plain light colours (white, off-white, light grey, pastels) 55 % of the light
  ones, paper 45 % of them: squared (faint blue or grey grid), lined (faint blue rules), dotted
  or textured (a faint grain); 15 % of non-black scenes are on a dark sheet (navy, charcoal;
  always for white shapes). Paper lines stay faint (20-45 RGB units from the sheet, the shapes
  at least 110), so they are never taken for a shape;
* shapes (single and group scenes): filled 50 %, outlined 22 %, sketched 28 % (drawn by hand:
  the outline a path whose points are pushed about by smooth low-frequency noise, its stroke
  overshooting or stopping short of where it began, its width varying; half of them coloured
  in, by a fill that does not exactly meet the stroke or by scribbles; an outlined sketched
  star is sometimes a pentagram); any rotation (circles aside), from a few pixels across to
  0.9 of the short side;
* words: typed (DejaVu Sans, bold 40 %) 70 %, handwritten 30 % (matplotlib ships no
  handwriting font: each letter tilted, scaled and lifted a little, its outline wobbled);
* finish: clean 45 %; degraded 25 % (noise, blur and/or JPEG, as a re-shared picture);
  photographed 30 % (the sheet photographed: a little perspective and rotation with the
  table showing at an edge or corner, light falling off across the sheet and at its corners,
  a warm or cool cast, focus blur, sensor noise, JPEG). The sheet moves and shrinks only a
  little (the centre of a single shape stays within 0.1 of its region's centre), so every
  answer below stays true in the photograph.

Scene semantics (the training generator uses the same):

* `single`: one shape. Its extent (bounding size over the shorter image side) is 0.08-0.25
  when `small`, 0.45-0.9 when `big`; its centre is within 0.05 of the frame of its region's
  centre (left 0.25/0.5, right 0.75/0.5, top 0.5/0.25, bottom 0.5/0.75, center 0.5/0.5); a big
  shape wider than 0.55 is always at the center.
* `group`: 2-5 shapes of one kind and one colour, each 0.12-0.25 across, well apart.
* `word`: one word of `WORDS`, its letters 25-38 % of the picture's height, inside the frame.

Each picture comes with one to three questions of different kinds that apply to its scene
(one 15 %, two 25 %, three 60 %, fewer where the scene has fewer kinds: a word has two): the
first is asked alone (turn 1), the others as follow-ups in the same chat.

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
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, Patch, PathPatch, Polygon, Rectangle, RegularPolygon
from matplotlib.path import Path as Path2D
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
MIN_DARK_LUMA_GAP = 60.0  # on navy or charcoal, the shape is at least this much brighter

INDEPENDENT_SET_VERSION = 2  # changes whenever the same (seed, index) draws another picture

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
# Common picture and photo aspects (long side over short side), either way up.
COMMON_ASPECTS = (4 / 3, 3 / 2, 5 / 4, 16 / 9)
MAX_ASPECT = 16 / 9
SHAPE_DRAWINGS = {"filled": 0.50, "outlined": 0.22, "sketched": 0.28}
HANDWRITTEN_SHARE = 0.30  # of the words
CHAT_LENGTHS = {"1": 0.15, "2": 0.25, "3": 0.60}  # questions per picture
FINISHES = {"clean": 0.45, "degraded": 0.25, "photographed": 0.30}
PAPERS = {"plain": 0.55, "squared": 0.15, "lined": 0.12, "dotted": 0.08, "textured": 0.10}
# Paper lines and dots this far from the sheet's colour (RGB distance): seen, never a shape.
PAPER_CONTRAST = (20.0, 45.0)
PAPER_INKS = ("#5B9BD5", "#6FA8DC", "#7EA6C9", "#9E9E9E", "#8FA3B8")
TABLES = ("#8B5A2B", "#A0522D", "#6F4E37", "#C19A6B", "#7A7A7A", "#5C5C5C", "#2F2F2F", "#D9D4CC")
# The photographed sheet: how far each corner moves in (of the side; out when negative) and
# how far it turns (degrees).
PHOTO_INSET = (-0.03, 0.04)
PHOTO_TURN = 3.0
# A photographed single shape's centre stays this close to its region's centre (of the side).
PHOTO_POSITION_SLACK = 0.10
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
class Photo:
    """How the sheet was photographed: where its corners landed, the light, the table."""

    # Top-left, top-right, bottom-right, bottom-left sheet corners in the photo (pixels).
    corners: tuple[tuple[float, float], ...]
    table: str  # hex
    light_angle: float  # degrees: the direction in which light grows
    light_low: float  # brightness gain on the dark side
    light_high: float  # and on the bright side
    vignette: float  # corners this much darker than the centre
    cast: tuple[float, float, float]  # per-channel gain: warm or cool light


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
    paper: str = "plain"  # plain / squared / lined / dotted / textured
    paper_ink: str = ""  # hex of the paper's lines or dots
    paper_step: float = 0.0  # pixels between them
    sketched: bool = False  # drawn by hand: wobbly shapes, handwritten words
    sketch_fill: str = ""  # sketched shapes: "" (outline only), "solid" or "scribble"
    finish: str = "clean"  # clean / degraded / photographed
    photo: Photo | None = None
    seed: int = 0  # the wobble, paper grain and table texture are drawn from it

    @property
    def aspect(self) -> float:
        return max(self.width, self.height) / min(self.width, self.height)

    @property
    def drawing(self) -> str:
        """filled / outlined / sketched / typed (a word in a font)."""
        if self.sketched:
            return "sketched"
        if not self.items:
            return "typed"
        return "outlined" if self.outline else "filled"


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
    scene, look, questions = independent_plan(seed, index)
    noise = np.random.default_rng([seed, index])
    return IndependentExample(index, render_png(look, scene, noise), scene, look, questions)


def independent_plan(
    seed: int, index: int
) -> tuple[IndependentScene, Look, list[tuple[str, str, str]]]:
    """What picture (seed, index) shows, how it looks and what it asks, without drawing it."""
    rng = random.Random(f"vilaserve-independent/{seed}/{index}")
    scene, look = plan_picture(rng)
    return scene, look, pick_questions(rng, scene)


def draw_example_png(
    *,
    seed: int = 0,
    scene: dict[str, Any] | None = None,
    look: dict[str, Any] | None = None,
) -> bytes:
    """One picture with some of its choices fixed, for the README, e.g.
    `draw_example_png(scene={"kind": "single", "shape": "square", "colour": "yellow",
    "size": "big", "position": "center"}, look={"background": "#FAF9F6"})`: the rest is
    drawn from `seed` (paper, sketch and photograph included). `look` keys override `Look`
    fields after planning (no checks): `{"paper": "plain", "sketched": False, "finish":
    "clean", "photo": None, "noise_sigma": 0.0, "blur_radius": 0.0, "jpeg_quality": None}`
    draws it crisp on a plain sheet."""
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
    look = Look(width, height, background, background_style, fill, seed=rng.getrandbits(32))
    look = replace(look, **_paper(rng, look))
    finish = _pick(rng, FINISHES)
    if kind == "word":
        word = fixed.get("word") or rng.choice(WORDS)
        look = replace(look, sketched=rng.random() < HANDWRITTEN_SHARE)
        look = replace(look, **_plan_word(rng, word, width, height))
        scene = IndependentScene("word", colour, word=word)
    else:
        shape = fixed.get("shape") or rng.choice(SHAPES)
        drawing = _pick(rng, SHAPE_DRAWINGS)
        # A wobbly or photographed shape keeps off the frame's edge, where the wobble or the
        # sheet's edge would cut it.
        margin = 0.04 if drawing == "sketched" or finish == "photographed" else 0.0
        if kind == "single":
            size = fixed.get("size") or rng.choice(SIZES)
            items, position = _plan_single(
                rng, shape, size, fixed.get("position"), width, height, margin
            )
            scene = IndependentScene(
                "single", colour, shape=shape, count=1, size=size, position=position
            )
        else:
            count = fixed.get("count") or rng.randint(2, 5)
            items = _plan_group(rng, shape, count, width, height, margin)
            scene = IndependentScene("group", colour, shape=shape, count=count)
        outline = drawing == "outlined" or (drawing == "sketched" and rng.random() < 0.5)
        line_px = 0.0
        if outline or drawing == "sketched":
            smallest = min(item.extent_px for item in items)
            line_px = max(1.5, smallest * rng.uniform(0.03, 0.08))
        sketch_fill = ""
        if drawing == "sketched" and not outline:
            sketch_fill = "scribble" if rng.random() < 0.4 else "solid"
        look = replace(
            look,
            items=tuple(items),
            outline=outline,
            line_px=line_px,
            sketched=drawing == "sketched",
            sketch_fill=sketch_fill,
        )
    look = replace(look, finish=finish)
    if finish == "degraded":
        look = replace(look, **_degradation(rng))
    elif finish == "photographed":
        look = replace(look, **_photograph_plan(rng, look, scene))
    return scene, look


def pick_questions(rng: random.Random, scene: IndependentScene) -> list[tuple[str, str, str]]:
    """Up to three questions of different kinds that apply to the scene, in asking order."""
    kinds = scene.question_kinds()
    rng.shuffle(kinds)
    asked = _pick(rng, CHAT_LENGTHS)
    shape = scene.shape or ""
    questions = []
    for name in kinds[: int(asked)]:
        phrasing = rng.choice(QUESTION_KINDS[name].phrasings[scene.kind])  # type: ignore[index]
        question = phrasing.format(shape=shape, shapes=shape + "s" if shape else "")
        questions.append((name, question, scene.answer(name)))
    return questions


def _pick(rng: random.Random, shares: dict[str, float]) -> str:
    return rng.choices(list(shares), list(shares.values()))[0]


def _picture_size(rng: random.Random) -> tuple[int, int]:
    roll = rng.random()
    if roll < 0.33:
        side = rng.randint(160, 320)
        return side, side
    if roll < 0.67:  # a common aspect, either way up
        aspect = rng.choice(COMMON_ASPECTS)
        short = rng.randint(160, int(320 / aspect))
        long = round(short * aspect)
        return (long, short) if rng.random() < 0.6 else (short, long)
    while True:
        width, height = rng.randint(160, 320), rng.randint(160, 320)
        if max(width, height) <= 1.6 * min(width, height):
            return width, height


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    value = hex_colour.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(min(max(c, 0), 255)):02X}" for c in rgb)


def _luma(hex_colour: str) -> float:
    red, green, blue = _rgb(hex_colour)
    return 0.299 * red + 0.587 * green + 0.114 * blue


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
        # On a dark sheet the shape must also be brighter: blue on navy has the RGB distance
        # but is hard to see.
        brighter = _luma(fill) - _luma(background) >= MIN_DARK_LUMA_GAP
        if _distance(fill, background) >= MIN_CONTRAST and (brighter or not dark):
            return style, background, fill


def _paper(rng: random.Random, look: Look) -> dict[str, Any]:
    """Plain, squared, lined, dotted or textured paper; dark sheets stay plain. Lines and
    dots are the sheet's colour moved a little towards a light blue or grey ink."""
    if look.background_style in DARK_BACKGROUNDS:
        return {}
    paper = _pick(rng, PAPERS)
    if paper in ("plain", "textured"):
        return {"paper": paper}
    sheet = np.array(_rgb(look.background), dtype=float)
    ink = np.array(_rgb(rng.choice(PAPER_INKS)), dtype=float)
    wanted = rng.uniform(*PAPER_CONTRAST)
    share = min(1.0, wanted / max(float(np.linalg.norm(ink - sheet)), 1.0))
    line = _hex(tuple(sheet + (ink - sheet) * share))
    short = min(look.width, look.height)
    step = {
        "squared": rng.uniform(0.05, 0.09) * short,
        "lined": rng.uniform(0.07, 0.11) * look.height,
        "dotted": rng.uniform(0.05, 0.08) * short,
    }[paper]
    return {"paper": paper, "paper_ink": line, "paper_step": step}


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
    margin: float = 0.0,
) -> tuple[list[Item], str]:
    short = min(width, height)
    edge = max(1.0, margin * short)
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
        if left >= edge and top >= edge and right <= width - edge and bottom <= height - edge:
            return [item], where


def _plan_group(
    rng: random.Random, shape: str, count: int, width: int, height: int, margin: float = 0.0
) -> list[Item]:
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
        edge = max(0.03, margin) * short
        if left < edge or top < edge or right > width - edge or bottom > height - edge:
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
    """Noise, blur and JPEG as a re-shared picture has them; at least one of the three."""
    while True:
        planned = {
            "noise_sigma": rng.uniform(3.0, 12.0) if rng.random() < 0.45 else 0.0,
            "blur_radius": rng.uniform(0.4, 1.2) if rng.random() < 0.3 else 0.0,
            "jpeg_quality": rng.randint(30, 90) if rng.random() < 0.55 else None,
        }
        if planned["noise_sigma"] or planned["blur_radius"] or planned["jpeg_quality"]:
            return planned


def _photograph_plan(rng: random.Random, look: Look, scene: IndependentScene) -> dict[str, Any]:
    """Where the sheet lands in the photo and the light it is taken in. The warp is redrawn
    smaller until the ink stays in the frame and a single shape near its region's centre."""
    width, height = look.width, look.height
    # A corner moves in (the table shows) or out (the sheet runs past the frame).
    insets = [(rng.uniform(*PHOTO_INSET), rng.uniform(*PHOTO_INSET)) for _ in range(4)]
    turn = rng.uniform(-PHOTO_TURN, PHOTO_TURN)
    box = _ink_box(look, scene)
    for shrink in (1.0, 0.5, 0.25, 0.0):
        corners = _sheet_corners(width, height, insets, turn, shrink)
        homography = _homography(_frame_corners(width, height), corners)
        left, top, right, bottom = box
        landed = _apply(
            homography, np.array([(left, top), (right, top), (right, bottom), (left, bottom)])
        )
        inside = (
            landed.min() >= 2
            and (landed[:, 0] <= width - 2).all()
            and (landed[:, 1] <= height - 2).all()
        )
        near = True
        if scene.kind == "single":
            (item,) = look.items
            ((cx, cy),) = _apply(homography, np.array([(item.x, item.y)]))
            fx, fy = REGION_CENTRES[scene.position or "center"]
            near = (
                abs(cx / width - fx) <= PHOTO_POSITION_SLACK
                and abs(cy / height - fy) <= PHOTO_POSITION_SLACK
            )
        if inside and near:
            break
    warm = rng.random() < 0.5
    cast_strength = rng.uniform(0.0, 1.0)
    cast = (
        (1.0, 1.0 - 0.05 * cast_strength, 1.0 - 0.15 * cast_strength)
        if warm
        else (1.0 - 0.1 * cast_strength, 1.0 - 0.03 * cast_strength, 1.0)
    )
    photo = Photo(
        corners=tuple((float(x), float(y)) for x, y in corners),
        table=rng.choice(TABLES),
        light_angle=rng.uniform(0.0, 360.0),
        light_low=rng.uniform(0.8, 0.93),
        light_high=rng.uniform(0.97, 1.03),
        vignette=rng.uniform(0.04, 0.2),
        cast=cast,
    )
    return {
        "photo": photo,
        "blur_radius": rng.uniform(0.3, 1.0),
        "noise_sigma": rng.uniform(2.0, 7.0),
        "jpeg_quality": rng.randint(55, 92),
    }


def _ink_box(look: Look, scene: IndependentScene) -> tuple[float, float, float, float]:
    """A box around everything drawn, with room for a sketch's wobble."""
    short = min(look.width, look.height)
    if scene.kind == "word":
        x0, y0, x1, y1 = _word_ink(scene.word or "", look.word_px, look.bold)
        cx, cy = look.word_xy
        half_w, half_h = (x1 - x0) / 2, (y1 - y0) / 2
        boxes = [(cx - half_w, cy - half_h, cx + half_w, cy + half_h)]
    else:
        boxes = [
            (
                i.x - i.extent_px / 2,
                i.y - i.extent_px / 2,
                i.x + i.extent_px / 2,
                i.y + i.extent_px / 2,
            )
            for i in look.items
        ]
    pad = 0.02 * short
    return (
        min(b[0] for b in boxes) - pad,
        min(b[1] for b in boxes) - pad,
        max(b[2] for b in boxes) + pad,
        max(b[3] for b in boxes) + pad,
    )


def _frame_corners(width: int, height: int) -> np.ndarray:
    return np.array([(0.0, 0.0), (width, 0.0), (width, height), (0.0, height)])


def _sheet_corners(
    width: int, height: int, insets: list[tuple[float, float]], turn: float, shrink: float
) -> np.ndarray:
    """The sheet's corners in the photo: each moved in by its inset, the whole turned about
    the centre; `shrink` scales both down towards a straight, full-frame sheet."""
    frame = _frame_corners(width, height)
    inward = np.array([(1, 1), (-1, 1), (-1, -1), (1, -1)], dtype=float)
    moved = frame + inward * np.array(insets) * np.array([width, height]) * shrink
    theta = math.radians(turn * shrink)
    centre = np.array([width / 2, height / 2])
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return (moved - centre) @ rotation.T + centre


def _homography(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 3x3 projective map that takes the four `source` points to the four `target` ones."""
    rows, values = [], []
    for (x, y), (u, v) in zip(source, target, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        values += [u, v]
    solved = np.linalg.solve(np.array(rows, dtype=float), np.array(values, dtype=float))
    return np.append(solved, 1.0).reshape(3, 3)


def _apply(homography: np.ndarray, points: np.ndarray) -> np.ndarray:
    lifted = np.hstack([points, np.ones((len(points), 1))]) @ homography.T
    return lifted[:, :2] / lifted[:, 2:]


def photo_point(look: Look, x: float, y: float) -> tuple[float, float]:
    """Where a point of the sheet lands in the picture (itself when not photographed)."""
    if look.photo is None:
        return x, y
    homography = _homography(_frame_corners(look.width, look.height), np.array(look.photo.corners))
    ((u, v),) = _apply(homography, np.array([(x, y)]))
    return float(u), float(v)


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


def _font(bold: bool, oblique: bool = False) -> FontProperties:
    return FontProperties(
        family="DejaVu Sans",
        weight="bold" if bold else "normal",
        style="oblique" if oblique else "normal",
    )


def _word_ink(word: str, size: float, bold: bool) -> tuple[float, float, float, float]:
    """The word's ink box at font size `size`, relative to its baseline origin, y up."""
    extents = TextPath((0, 0), word, size=size, prop=_font(bold)).get_extents()
    return extents.x0, extents.y0, extents.x1, extents.y1


# --- drawing by hand --------------------------------------------------------------------------


def _smooth_noise(
    jitter: np.random.Generator, t: np.ndarray, waves: int, frequencies: tuple[float, float]
) -> np.ndarray:
    """A smooth wiggle along `t`, about -1..1: a few sines of low, non-integer frequency (so a
    closed outline does not come back to where it started)."""
    total = np.zeros_like(t)
    for k in range(waves):
        frequency = jitter.uniform(*frequencies)
        total += (
            jitter.uniform(0.5, 1.0)
            / (k + 1)
            * np.sin(2 * np.pi * frequency * t + jitter.uniform(0, 2 * np.pi))
        )
    return total / 1.6


def _ring(shape: str, item: Item, jitter: np.random.Generator) -> np.ndarray:
    """The shape's closed outline in pixels, as a person's hand would follow it (a circle a
    little squashed); the first point is repeated at the end."""
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 97)
        squash, tilt = jitter.uniform(0.9, 1.0), jitter.uniform(0, np.pi)
        x, y = np.cos(angles), np.sin(angles) * squash
        points = np.stack(
            [x * np.cos(tilt) - y * np.sin(tilt), x * np.sin(tilt) + y * np.cos(tilt)], axis=1
        )
        return points * item.extent_px / 2 + np.array([item.x, item.y])
    corners, _, _ = _placed(shape, item, 0.0)
    return np.vstack([corners, corners[:1]])


def _along(ring: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Points at the given fractions of the ring's length (fractions above 1 go round again)."""
    steps = np.linalg.norm(np.diff(ring, axis=0), axis=1)
    walked = np.concatenate([[0.0], np.cumsum(steps)]) / steps.sum()
    wrapped = np.mod(positions, 1.0)
    return np.stack(
        [np.interp(wrapped, walked, ring[:, 0]), np.interp(wrapped, walked, ring[:, 1])], axis=1
    )


def _sketch_shape(
    shape: str, item: Item, look: Look, jitter: np.random.Generator
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray | None]:
    """A hand-drawn shape: strokes (points, width per point) and the coloured-in area (or
    None), moved and scaled together so that the drawing fills the planned box."""
    ring = _ring(shape, item, jitter)
    extent = item.extent_px
    strokes: list[np.ndarray] = []
    if shape == "star" and look.outline and jitter.random() < 0.4:
        # A pentagram, drawn in one line: every second point of the star.
        tips = ring[:-1][::2]
        ring = np.vstack([tips[[0, 2, 4, 1, 3]], tips[:1]])
    begin = jitter.uniform(0, 1)
    reach = 1.0 + jitter.uniform(-0.03, 0.07)  # under 1: stops short; over: overshoots
    t = np.linspace(0.0, reach, 240)
    points = _along(ring, begin + t)
    # A hand wobbles by a pixel or so even on a tiny shape.
    amplitude = max(jitter.uniform(0.015, 0.04) * extent, 1.0)
    wiggle = np.stack(
        [_smooth_noise(jitter, t, 3, (0.6, 3.5)), _smooth_noise(jitter, t, 3, (0.6, 3.5))], axis=1
    )
    tremor = np.stack([_smooth_noise(jitter, t, 2, (12, 25)) for _ in range(2)], axis=1)
    strokes.append(points + wiggle * amplitude + tremor * 0.003 * extent)
    widths = [
        np.clip(look.line_px * (1 + 0.35 * _smooth_noise(jitter, t, 2, (0.8, 3.0))), 1.0, None)
    ]
    area = None
    if look.sketch_fill:
        around = np.linspace(0.0, 1.0, 200)
        base = _along(_ring(shape, item, jitter) if shape == "circle" else ring, around)
        wobble = np.stack(
            [np.sin(2 * np.pi * k * around + jitter.uniform(0, 2 * np.pi)) for k in (2, 3)], axis=1
        )
        centre = np.array([item.x, item.y])
        squeeze = jitter.uniform(0.9, 1.0)
        shift = jitter.uniform(-0.025, 0.025, size=2) * extent
        area = (
            (base - centre) * squeeze
            + centre
            + shift
            + wobble * jitter.uniform(0.005, 0.015) * extent
        )
    # Fit the whole drawing (strokes with their width, the area) into the planned box.
    everything = np.vstack(strokes + ([area] if area is not None else []))
    half = max(float(w.max()) for w in widths) / 2
    low, high = everything.min(axis=0), everything.max(axis=0)
    scale = max(extent - 2 * half, 1.0) / float((high - low).max())
    middle = (low + high) / 2
    target = np.array([item.x, item.y])

    def fitted(points: np.ndarray) -> np.ndarray:
        return (points - middle) * scale + target

    drawn = [(fitted(s), w) for s, w in zip(strokes, widths, strict=True)]
    return drawn, fitted(area) if area is not None else None


def _scribble(
    area: np.ndarray, line_px: float, jitter: np.random.Generator
) -> tuple[np.ndarray, float]:
    """Back-and-forth strokes across the area's box at a slant, close enough to colour it in
    with a few gaps; drawn clipped to the area."""
    angle = jitter.uniform(0, np.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    across = np.array([-direction[1], direction[0]])
    centre = (area.min(axis=0) + area.max(axis=0)) / 2
    reach = float(np.linalg.norm(area.max(axis=0) - area.min(axis=0))) / 2 + line_px
    width = max(1.5, line_px * jitter.uniform(1.0, 1.8))
    gap = width * jitter.uniform(0.8, 1.15)
    offsets = np.arange(-reach, reach + gap, gap)
    turns = []
    for n, offset in enumerate(offsets):
        ends = (-reach, reach) if n % 2 == 0 else (reach, -reach)
        for end in ends:
            wander = jitter.uniform(-0.3, 0.3) * gap
            turns.append(centre + direction * end + across * (offset + wander))
    return np.array(turns), width


def _handwritten(word: str, look: Look, jitter: np.random.Generator) -> Path2D:
    """The word as a hand might write it: each letter of a plain font tilted, scaled and
    lifted a little, the outlines bent by a smooth wobble, then fitted into the planned ink
    box (y pointing down)."""
    font = _font(look.bold, oblique=jitter.random() < 0.5)
    vertices, codes = [], []
    x = 0.0
    for letter in word:
        glyph = TextPath((0, 0), letter, size=100, prop=font)
        box = glyph.get_extents()
        theta = math.radians(jitter.uniform(-9, 9))
        rotation = np.array(
            [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
        )
        middle = np.array([(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2])
        scale = jitter.uniform(0.88, 1.12)
        lift = jitter.uniform(-5, 5)
        points = (glyph.vertices - middle) @ rotation.T * scale + middle
        points += np.array([x - box.x0, lift])
        vertices.append(points)
        codes.append(glyph.codes)
        x += box.width * scale + jitter.uniform(4, 14)
    every = np.vstack(vertices)
    waves = [(jitter.uniform(25, 60), jitter.uniform(0, 2 * np.pi)) for _ in range(4)]
    amplitude = jitter.uniform(1.5, 3.0)
    bent = every.copy()
    bent[:, 0] += amplitude * (
        np.sin(2 * np.pi * every[:, 1] / waves[0][0] + waves[0][1])
        + 0.5 * np.sin(2 * np.pi * every[:, 0] / waves[1][0] + waves[1][1])
    )
    bent[:, 1] += amplitude * (
        np.sin(2 * np.pi * every[:, 0] / waves[2][0] + waves[2][1])
        + 0.5 * np.sin(2 * np.pi * every[:, 1] / waves[3][0] + waves[3][1])
    )
    bent[:, 1] *= -1  # y down, as in the picture
    x0, y0, x1, y1 = _word_ink(word, look.word_px, look.bold)
    planned_w, planned_h = x1 - x0, y1 - y0
    low, high = bent.min(axis=0), bent.max(axis=0)
    # As wide as the typed word; a little taller is fine (the plan leaves a margin).
    scale = min(planned_w / (high[0] - low[0]), 1.1 * planned_h / (high[1] - low[1]))
    fitted = (bent - (low + high) / 2) * scale + np.array(look.word_xy)
    return Path2D(fitted, np.concatenate(codes))


# --- rendering --------------------------------------------------------------------------------


def render_png(look: Look, scene: IndependentScene, noise: np.random.Generator) -> bytes:
    pixels = _render(look, scene)
    if look.photo is not None:
        pixels = _photograph(pixels, look)
    picture = Image.fromarray(pixels, "RGB")
    if look.blur_radius:
        picture = picture.filter(ImageFilter.GaussianBlur(look.blur_radius))
    if look.noise_sigma:
        noisy = np.asarray(picture, dtype=np.float32)
        grain = noise.normal(0.0, look.noise_sigma, noisy.shape).astype(np.float32)
        if look.photo is not None:  # a sensor's noise is mostly in brightness, a little in hue
            grain = grain * 0.5 + noise.normal(0.0, look.noise_sigma, (*noisy.shape[:2], 1)).astype(
                np.float32
            )
        noisy += grain
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
    jitter = np.random.default_rng(look.seed)
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor=look.background)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)  # pixel coordinates: the origin at the top left
    axes.set_axis_off()
    axes.set_facecolor(look.background)
    _draw_paper(axes, look, jitter)
    if scene.kind == "word" and look.sketched:
        axes.add_patch(
            PathPatch(
                _handwritten(scene.word or "", look, jitter),
                facecolor=look.fill,
                edgecolor=look.fill,
                linewidth=jitter.uniform(0.0, 0.03) * look.word_px,
                joinstyle="round",
            )
        )
    elif scene.kind == "word":
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
    elif look.sketched:
        for item in look.items:
            _draw_sketch(axes, scene.shape or "", item, look, jitter)
    else:
        for item in look.items:
            axes.add_patch(_patch(scene.shape or "", item, look))
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[:, :, :3].copy()
    if pixels.shape[:2] != (height, width):  # never seen; keeps the promised size regardless
        pixels = np.asarray(Image.fromarray(pixels).resize((width, height)))
    return pixels


def _draw_paper(axes: Any, look: Look, jitter: np.random.Generator) -> None:
    """Faint squared, lined or dotted paper, or a faint grain, under the drawing."""
    width, height, step = look.width, look.height, look.paper_step
    if look.paper == "textured":
        sheet = np.array(_rgb(look.background), dtype=float)
        grain = jitter.normal(0.0, 1.0, (height // 4 + 2, width // 4 + 2))
        coarse = (
            np.asarray(
                Image.fromarray(((grain + 4) * 32).clip(0, 255).astype(np.uint8)).resize(
                    (width, height), Image.BICUBIC
                ),
                dtype=float,
            )
            / 32
            - 4
        )
        fine = jitter.normal(0.0, 1.0, (height, width))
        shade = coarse * jitter.uniform(2.0, 4.0) + fine * jitter.uniform(1.0, 2.5)
        texture = np.clip(sheet + shade[:, :, None], 0, 255).astype(np.uint8)
        axes.imshow(texture, extent=(0, width, height, 0), interpolation="nearest", zorder=0)
        axes.set_xlim(0, width)
        axes.set_ylim(height, 0)
        return
    if look.paper not in ("squared", "lined", "dotted"):
        return
    start = jitter.uniform(0.2, 1.0) * step
    rows = np.arange(start, height, step)
    line = jitter.uniform(0.7, 1.2)
    if look.paper == "dotted":
        columns = np.arange(jitter.uniform(0.2, 1.0) * step, width, step)
        xs, ys = np.meshgrid(columns, rows)
        axes.scatter(
            xs.ravel(), ys.ravel(), s=(line * 1.8) ** 2, c=look.paper_ink, linewidths=0, zorder=0.5
        )
        return
    segments = [((0, y), (width, y)) for y in rows]
    if look.paper == "squared":
        segments += [
            ((x, 0), (x, height)) for x in np.arange(jitter.uniform(0.2, 1.0) * step, width, step)
        ]
    axes.add_collection(
        LineCollection(segments, colors=look.paper_ink, linewidths=line, zorder=0.5)
    )


def _draw_sketch(
    axes: Any, shape: str, item: Item, look: Look, jitter: np.random.Generator
) -> None:
    strokes, area = _sketch_shape(shape, item, look, jitter)
    if area is not None:
        alpha = jitter.uniform(0.8, 1.0)
        if look.sketch_fill == "solid":
            axes.add_patch(
                Polygon(area, closed=True, facecolor=look.fill, edgecolor="none", alpha=alpha)
            )
        else:
            region = Polygon(area, closed=True, facecolor="none", edgecolor="none")
            axes.add_patch(region)
            turns, width = _scribble(area, look.line_px, jitter)
            scribble = Line2D(
                turns[:, 0],
                turns[:, 1],
                color=look.fill,
                linewidth=width,
                alpha=alpha,
                solid_capstyle="round",
                solid_joinstyle="round",
            )
            scribble.set_clip_path(region)
            axes.add_line(scribble)
    for points, widths in strokes:
        segments = np.stack([points[:-1], points[1:]], axis=1)
        axes.add_collection(
            LineCollection(
                segments,
                colors=look.fill,
                linewidths=(widths[:-1] + widths[1:]) / 2,
                capstyle="round",
                joinstyle="round",
            )
        )


def _photograph(pixels: np.ndarray, look: Look) -> np.ndarray:
    """The sheet as a camera sees it on a table: warped into its corners, the table around
    it, light falling off across the picture and at its corners, a colour cast."""
    photo = look.photo
    assert photo is not None
    height, width = pixels.shape[:2]
    jitter = np.random.default_rng(look.seed + 1)
    # PIL maps each picture pixel back onto the sheet: the inverse of sheet -> picture.
    back = _homography(np.array(photo.corners), _frame_corners(width, height))
    coefficients = tuple((back / back[2, 2]).ravel()[:8])
    sheet = Image.fromarray(pixels, "RGB").convert("RGBA")
    warped = sheet.transform((width, height), Image.PERSPECTIVE, coefficients, Image.BICUBIC)
    table = _table(photo.table, width, height, jitter)
    table.alpha_composite(warped)
    picture = np.asarray(table.convert("RGB"), dtype=np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xs / width - 0.5, ys / height - 0.5
    angle = math.radians(photo.light_angle)
    along = (u * math.cos(angle) + v * math.sin(angle)) / (
        0.5 * (abs(math.cos(angle)) + abs(math.sin(angle)))
    )
    light = photo.light_low + (photo.light_high - photo.light_low) * (along + 1) / 2
    light *= 1.0 - photo.vignette * (u**2 + v**2) / 0.5
    lit = picture * light[:, :, None] * np.array(photo.cast, dtype=np.float32)
    return np.clip(lit, 0, 255).round().astype(np.uint8)


def _table(colour: str, width: int, height: int, jitter: np.random.Generator) -> Image.Image:
    """A table top: its colour with a faint grain along one direction, as wood or a desk."""
    base = np.array(_rgb(colour), dtype=np.float32)
    angle = jitter.uniform(0, np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    across = xs * math.sin(angle) - ys * math.cos(angle)
    grain = np.sin(across / jitter.uniform(2.0, 6.0)) * jitter.uniform(3, 10)
    grain += jitter.normal(0.0, 3.0, (height, width))
    surface = np.clip(base + grain[:, :, None], 0, 255).astype(np.uint8)
    return Image.fromarray(surface, "RGB").convert("RGBA")


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
