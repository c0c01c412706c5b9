"""Generated pictures with questions and short exact answers: the demo model's whole world.

Every example is a function of (split, seed, index) alone, so a training run, a benchmark and
a test can each regenerate exactly the pictures they need without storing any. Three kinds of
scene (`SCENE_KINDS`):

* `single`: one shape of some colour, big or small, at the left, right, top, bottom or center;
* `group`: two to five shapes of one kind and colour, scattered;
* `word`: one word (from `WORDS`) written in some colour with PIL's built-in font.

Backgrounds are muted tints (never one of the named colours) drawn differently per split, and
the image sizes of the two splits never coincide: training uses sides that are multiples of
16, held-out evaluation only other sides. `VOCABULARY` lists every question kind with its
phrasings and the answers it can have; the README shows it as a table.
"""

from __future__ import annotations

import colorsys
import io
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

Split = Literal["train", "eval"]
SPLITS: tuple[Split, ...] = ("train", "eval")

SHAPES = ("circle", "square", "rectangle", "triangle", "star")
PLURALS = {shape: shape + "s" for shape in SHAPES}
# Saturated, well-separated hues; a little per-picture jitter is added when drawing.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (218, 36, 36),
    "green": (34, 160, 52),
    "blue": (36, 82, 222),
    "yellow": (242, 212, 24),
    "orange": (246, 128, 20),
    "purple": (138, 48, 178),
    "black": (16, 16, 16),
    "white": (246, 246, 246),
}
SIZES = ("small", "big")
POSITIONS = ("left", "right", "top", "bottom", "center")
MAX_GROUP = 5
COUNTS = tuple(str(n) for n in range(1, MAX_GROUP + 1))
# Few and short, drawn big: a tower this small learns to read twelve words in minutes.
WORDS = (
    "cat", "dog", "sun", "tree", "fish", "bird", "moon", "boat", "car", "book", "cake", "frog",
)  # fmt: skip

SceneKind = Literal["single", "group", "word"]
SCENE_KINDS: tuple[SceneKind, ...] = ("single", "group", "word")
_SCENE_WEIGHTS = (0.45, 0.30, 0.25)


@dataclass(frozen=True)
class QuestionKind:
    """One kind of question: the scenes it is asked about, its phrasings, its answers."""

    name: str
    scenes: tuple[SceneKind, ...]
    phrasings: dict[SceneKind, tuple[str, ...]]
    answers: str  # the answer set, in words (for the README table)


# `{shape}`/`{shapes}` are filled with the scene's shape name (singular/plural). No free
# "describe the picture" kind: the frozen 135M LLM could not be taught to compose a phrase like
# "3 red circles" from the image tokens (0 % exact even from a perfect caption), so the scored
# questions are the ones with a one-word answer. `Scene.answer("describe")` remains for the
# calibration text.
VOCABULARY: tuple[QuestionKind, ...] = (
    QuestionKind(
        "shape",
        ("single", "group"),
        {
            "single": (
                "What shape is this?",
                "What shape is in the picture?",
                "Which shape do you see?",
                "Name the shape in the image.",
            ),
            "group": (
                "What shape are these?",
                "Which shapes do you see?",
                "What kind of shape is in the picture?",
            ),
        },
        " / ".join(SHAPES),
    ),
    QuestionKind(
        "colour",
        ("single", "group", "word"),
        {
            "single": (
                "What colour is the {shape}?",
                "What color is the shape?",
                "Which colour is it?",
                "What is the colour of the {shape}?",
            ),
            "group": (
                "What colour are the {shapes}?",
                "What color are the shapes?",
                "Which colour do the {shapes} have?",
            ),
            "word": (
                "What colour is the text?",
                "What color is the word?",
                "In which colour is the word written?",
            ),
        },
        " / ".join(COLOURS),
    ),
    QuestionKind(
        "size",
        ("single",),
        {
            "single": (
                "Is the {shape} big or small?",
                "How big is the shape?",
                "Is it small or big?",
                "What size is the {shape}?",
            )
        },
        " / ".join(SIZES),
    ),
    QuestionKind(
        "position",
        ("single",),
        {
            "single": (
                "Where is the {shape}?",
                "Where is the shape in the picture?",
                "In which part of the image is the {shape}?",
                "Where is it?",
            )
        },
        " / ".join(POSITIONS),
    ),
    QuestionKind(
        "count",
        ("single", "group"),
        {
            kind: (
                "How many {shapes} are there?",
                "How many shapes are in the picture?",
                "Count the {shapes}.",
                "How many {shapes} do you see?",
            )
            for kind in ("single", "group")
        },
        f"1 ... {MAX_GROUP}",
    ),
    QuestionKind(
        "text",
        ("word",),
        {
            "word": (
                "What does the text say?",
                "What word is written in the image?",
                "Read the word in the picture.",
                "What is written here?",
            )
        },
        " / ".join(WORDS),
    ),
)
QUESTION_KINDS = tuple(kind.name for kind in VOCABULARY)


@dataclass(frozen=True)
class Scene:
    """What a picture shows; the fields a scene kind does not have are None."""

    kind: SceneKind
    colour: str
    shape: str | None = None
    count: int | None = None
    size: str | None = None
    position: str | None = None
    word: str | None = None

    def answer(self, question_kind: str) -> str:
        if question_kind == "shape":
            return _required(self.shape)
        if question_kind == "colour":
            return self.colour
        if question_kind == "size":
            return _required(self.size)
        if question_kind == "position":
            return _required(self.position)
        if question_kind == "count":
            return str(_required(self.count))
        if question_kind == "text":
            return _required(self.word)
        if question_kind == "describe":
            if self.kind == "word":
                return f"the word {self.word}"
            if self.kind == "single":
                return f"a {self.colour} {self.shape}"
            return f"{self.count} {self.colour} {PLURALS[_required(self.shape)]}"
        raise ValueError(f"unknown question kind {question_kind!r}")


@dataclass(frozen=True)
class DemoExample:
    image: Image.Image
    # Which object each pixel shows: 0 background, k the k-th shape (1-based), 1 the word's box.
    mask: Image.Image
    scene: Scene
    question_kind: str
    question: str
    answer: str

    def png(self) -> bytes:
        """The picture as PNG bytes, as a client would send it."""
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()


def generate(split: Split, seed: int, index: int) -> DemoExample:
    """The `index`-th example of `split` for `seed`: a picture, one question, its answer."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"vilaserve-demo/{split}/{seed}/{index}")
    width, height = _image_size(rng, split)
    image = _background(rng, split, width, height)
    kind: SceneKind = rng.choices(SCENE_KINDS, weights=_SCENE_WEIGHTS)[0]
    colour = rng.choice(tuple(COLOURS))
    draw = _Canvas(image)
    if kind == "single":
        scene = _draw_single(rng, draw, width, height, colour)
    elif kind == "group":
        scene = _draw_group(rng, draw, width, height, colour)
    else:
        scene = _draw_word(rng, draw, width, height, colour)
    question_kind, question, answer = ask(rng, scene)
    return DemoExample(image, draw.mask, scene, question_kind, question, answer)


def ask(rng: random.Random, scene: Scene, skip: Sequence[str] = ()) -> tuple[str, str, str]:
    """A question about `scene` of a kind not in `skip`: (kind, question, answer)."""
    kinds = [q for q in VOCABULARY if scene.kind in q.scenes and q.name not in skip]
    question_kind = rng.choice(kinds)
    phrasing = rng.choice(question_kind.phrasings[scene.kind])
    shape = scene.shape or ""
    question = phrasing.format(shape=shape, shapes=PLURALS.get(shape, ""))
    return question_kind.name, question, scene.answer(question_kind.name)


def conversation(rng: random.Random, example: DemoExample, turns: int) -> list[tuple[str, str]]:
    """`turns` (question, answer) pairs about one picture, as one chat asks them: the example's
    own question last, earlier turns of other kinds while there are any."""
    asked = [example.question_kind]
    earlier: list[tuple[str, str]] = []
    for _ in range(turns - 1):
        kinds = [q.name for q in VOCABULARY if example.scene.kind in q.scenes]
        skip = asked if len(asked) < len(kinds) else [example.question_kind]
        kind, question, answer = ask(rng, example.scene, skip)
        asked.append(kind)
        earlier.append((question, answer))
    return [*earlier, (example.question, example.answer)]


def examples(split: Split, seed: int, count: int, start: int = 0) -> Iterator[DemoExample]:
    for index in range(start, start + count):
        yield generate(split, seed, index)


def normalize_answer(text: str) -> str:
    """The form answers are compared in: lower case, no surrounding space or final period."""
    return " ".join(text.strip().lower().rstrip(".").split())


# --- drawing ----------------------------------------------------------------------------------


def _required(value: str | int | None) -> str | int:
    if value is None:
        raise ValueError("this question does not apply to this scene")
    return value


def _image_size(rng: random.Random, split: Split) -> tuple[int, int]:
    """Sides in [128, 400], aspect ratio within 1.25 (the model squashes to a square, so a
    wider picture would turn squares into rectangles). Training sides are multiples of 16,
    evaluation sides never are: no size is shared between the splits."""
    while True:
        if split == "train":
            width, height = rng.randrange(128, 401, 16), rng.randrange(128, 401, 16)
        else:
            width, height = rng.randrange(129, 400), rng.randrange(129, 400)
            if width % 16 == 0 or height % 16 == 0:
                continue
        if max(width, height) <= 1.25 * min(width, height):
            return width, height


def _tint(rng: random.Random, split: Split, lightness_shift: float = 0.0) -> tuple[int, int, int]:
    """A muted colour: low saturation, mid lightness, so every named colour stands out on it.
    The colour wheel is cut into 24 sectors: training tints take the even ones, evaluation
    tints the odd ones, so both see every kind of hue but never the same background colour."""
    sector = 2 * rng.randrange(12) + (1 if split == "eval" else 0)
    hue = (sector + rng.random()) / 24
    lightness = min(0.8, max(0.3, rng.uniform(0.38, 0.7) + lightness_shift))
    saturation = rng.uniform(0.04, 0.2)
    r, g, b = colorsys.hls_to_rgb(hue, lightness, saturation)
    return round(r * 255), round(g * 255), round(b * 255)


def _background(rng: random.Random, split: Split, width: int, height: int) -> Image.Image:
    """Training: flat, vertical gradient, speckled or cloudy. Evaluation: horizontal, diagonal
    or radial gradient; none of these is ever seen in training."""
    first = _tint(rng, split)
    styles = (
        ("flat", "vertical", "speckle", "clouds")
        if split == "train"
        else ("horizontal", "diagonal", "radial")
    )
    style = rng.choice(styles)
    base = Image.new("RGB", (width, height), first)
    if style == "flat":
        return base
    second = Image.new("RGB", (width, height), _tint(rng, split, rng.choice((-0.15, 0.15))))
    if style == "speckle":
        return Image.blend(base, _noise(rng, width, height).convert("RGB"), rng.uniform(0.06, 0.14))
    if style == "clouds":  # soft blotches of the second tint
        blotches = _noise(rng, max(2, width // 24), max(2, height // 24))
        mask = blotches.resize((width, height), Image.Resampling.BICUBIC).point(lambda v: v // 2)
        return Image.composite(second, base, mask.filter(ImageFilter.GaussianBlur(4)))
    ramp = Image.linear_gradient("L").resize((width, height))  # dark at the top
    if style == "radial":  # lighter or darker towards the edges
        ramp = Image.radial_gradient("L").resize((width, height))
    elif style == "horizontal":
        ramp = ramp.transpose(Image.Transpose.ROTATE_90).resize((width, height))
    elif style == "diagonal":
        across = ramp.transpose(Image.Transpose.ROTATE_90).resize((width, height))
        ramp = ImageChops.add(ramp, across, scale=2.0)
    return Image.composite(second, base, ramp)


def _noise(rng: random.Random, width: int, height: int) -> Image.Image:
    """Uniform grey noise from `rng` (PIL's own noise ignores our seed)."""
    return Image.frombytes("L", (width, height), rng.randbytes(width * height))


def _paint(rng: random.Random, colour: str) -> tuple[int, int, int]:
    r, g, b = COLOURS[colour]
    return tuple(max(0, min(255, c + rng.randint(-14, 14))) for c in (r, g, b))  # type: ignore[return-value]


def _rotated(points: list[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    cos, sin = math.cos(angle), math.sin(angle)
    return [(x * cos - y * sin, x * sin + y * cos) for x, y in points]


def _outline(rng: random.Random, shape: str, extent: float) -> list[tuple[float, float]]:
    """Polygon points around (0, 0) for a shape about `extent` pixels across (not circles)."""
    tilt = math.radians(rng.uniform(-12, 12))
    if shape == "square":
        half = extent * 0.42
        return _rotated([(-half, -half), (half, -half), (half, half), (-half, half)], tilt)
    if shape == "rectangle":
        long_half, short_half = extent * 0.5, extent * 0.5 / rng.uniform(2.2, 3.0)
        corners = [(-long_half, -short_half), (long_half, -short_half)]
        corners += [(long_half, short_half), (-long_half, short_half)]
        if rng.random() < 0.5:  # upright
            corners = [(y, x) for x, y in corners]
        return _rotated(corners, tilt)
    if shape == "triangle":
        radius = extent * 0.55
        angles = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        # Equilateral, pointing up; its centroid sits a little below the middle of its box.
        points = [(radius * math.cos(a), radius * math.sin(a) + radius * 0.2) for a in angles]
        return _rotated(points, tilt)
    if shape == "star":
        outer = extent * 0.55
        inner = outer * 0.42
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else inner
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((radius * math.cos(angle), radius * math.sin(angle)))
        return _rotated(points, tilt)
    raise ValueError(f"unknown shape {shape!r}")


class _Canvas:
    """Draws on the picture and, with the object's number, on its object mask."""

    def __init__(self, image: Image.Image) -> None:
        self.picture = ImageDraw.Draw(image)
        self.mask = Image.new("L", image.size, 0)
        self._mask = ImageDraw.Draw(self.mask)
        self.objects = 0

    def ellipse(self, box: tuple[float, float, float, float], fill: tuple[int, ...]) -> None:
        self.objects += 1
        self.picture.ellipse(box, fill=fill)
        self._mask.ellipse(box, fill=self.objects)

    def polygon(self, points: list[tuple[float, float]], fill: tuple[int, ...]) -> None:
        self.objects += 1
        self.picture.polygon(points, fill=fill)
        self._mask.polygon(points, fill=self.objects)

    def text(
        self,
        xy: tuple[float, float],
        word: str,
        font: ImageFont.FreeTypeFont,
        fill: tuple[int, ...],
    ) -> None:
        self.objects += 1
        self.picture.text(xy, word, font=font, fill=fill)
        # The word's whole box is its region: thin strokes alone would cover too few pixels.
        self._mask.rectangle(self.picture.textbbox(xy, word, font=font), fill=self.objects)

    def textbbox(self, word: str, font: ImageFont.FreeTypeFont) -> tuple[float, ...]:
        return tuple(self.picture.textbbox((0, 0), word, font=font))


def _draw_shape(
    rng: random.Random,
    draw: _Canvas,
    shape: str,
    colour: str,
    centre: tuple[float, float],
    extent: float,
) -> None:
    fill = _paint(rng, colour)
    cx, cy = centre
    if shape == "circle":
        radius = extent * 0.48
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill)
        return
    points = [(cx + x, cy + y) for x, y in _outline(rng, shape, extent)]
    draw.polygon(points, fill)


# Centres of the five regions, as fractions of (width, height).
_REGION_CENTRES = {
    "left": (0.26, 0.5),
    "right": (0.74, 0.5),
    "top": (0.5, 0.26),
    "bottom": (0.5, 0.74),
    "center": (0.5, 0.5),
}


def _draw_single(rng: random.Random, draw: _Canvas, width: int, height: int, colour: str) -> Scene:
    shape, size, position = rng.choice(SHAPES), rng.choice(SIZES), rng.choice(POSITIONS)
    side = min(width, height)
    extent = side * (rng.uniform(0.2, 0.25) if size == "small" else rng.uniform(0.4, 0.46))
    fx, fy = _REGION_CENTRES[position]
    centre = ((fx + rng.uniform(-0.03, 0.03)) * width, (fy + rng.uniform(-0.03, 0.03)) * height)
    _draw_shape(rng, draw, shape, colour, centre, extent)
    return Scene("single", colour, shape=shape, count=1, size=size, position=position)


def _draw_group(rng: random.Random, draw: _Canvas, width: int, height: int, colour: str) -> Scene:
    shape, count = rng.choice(SHAPES), rng.randint(2, MAX_GROUP)
    for x, y, extent in scatter(rng, count, width, height, (0.18, 0.24), 0.6):
        _draw_shape(rng, draw, shape, colour, (x, y), extent)
    return Scene("group", colour, shape=shape, count=count)


def scatter(
    rng: random.Random,
    count: int,
    width: int,
    height: int,
    extents: tuple[float, float],
    margin: float,
) -> list[tuple[float, float, float]]:
    """(x, y, extent) of `count` shapes well apart, so that no two touch and each is counted
    once; extents are shares of the short side, each centre `margin` extents from the border.
    A crowded frame starts over with smaller shapes."""
    side = min(width, height)
    placed: list[tuple[float, float, float]] = []
    scale, tries = 1.0, 0
    while len(placed) < count:
        tries += 1
        if tries % 200 == 0:
            placed, scale = [], scale * 0.9
        extent = side * rng.uniform(*extents) * scale
        x = rng.uniform(extent * margin, width - extent * margin)
        y = rng.uniform(extent * margin, height - extent * margin)
        if all(math.hypot(x - px, y - py) > (extent + pe) * 0.62 for px, py, pe in placed):
            placed.append((x, y, extent))
    return placed


def _draw_word(rng: random.Random, draw: _Canvas, width: int, height: int, colour: str) -> Scene:
    word = rng.choice(WORDS)
    size = round(height * rng.uniform(0.3, 0.38))
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox(word, font)
    if right - left > 0.88 * width:  # a long word in a narrow picture: shrink to fit
        font = ImageFont.load_default(size=int(size * 0.88 * width / (right - left)))
        left, top, right, bottom = draw.textbbox(word, font)
    x = rng.uniform(0.06 * width, max(0.06 * width, width * 0.94 - (right - left))) - left
    y = rng.uniform(0.06 * height, max(0.06 * height, height * 0.94 - (bottom - top))) - top
    draw.text((x, y), word, font, _paint(rng, colour))
    return Scene("word", colour, word=word)
