"""Training pictures drawn the way people draw them: the demo's second picture style.

`shapes.generate` draws the demo's original style (muted backgrounds, shapes of two narrow
size bands, slightly tilted, filled, aliased). People bring something else: a yellow square
filling most of a white page, a diamond, a red outline of a triangle on grey, a screenshot
saved as JPEG. This module draws the same scenes and asks the same questions (`shapes.Scene`,
`shapes.VOCABULARY`: the answers keep their meaning) with a much wider picture distribution:

* backgrounds: white, off-white, light pastel, mid grey, muted tints and dark plain colours,
  sometimes with paper-like noise; never too close to the shape's colour;
* frames from 96 to 480 px, aspect ratios up to 2:1 (the demo pads to a square, so a square
  stays square);
* shapes from tiny to filling most of the frame and touching its border, at any rotation
  (diamonds, upright and slanted rectangles, triangles of three kinds), filled or outlined;
* several shades per colour name (a person's "green" is often #008000 or #00FF00);
* aliased or anti-aliased edges, and photographic damage: blur, noise, down-scaling, JPEG;
* sketched shapes (`_sketched`): a hand's wobble along the outline, strokes that overshoot or
  leave a gap, fills that miss the stroke;
* ruled or squared paper (faint lines), and photographs of the sheet (`_photographed`): uneven
  light with a warm or cool cast, the sheet slightly turned.

`size` keeps a gap between its two answers (small: at most 0.28 of the short side, big: at
least 0.45) so that every answer is clear, and a big shape filling more than 0.56 of the frame
is always at the `center`. Every example is a function of (seed, index), like `shapes`.
"""

from __future__ import annotations

import colorsys
import io
import math
import random
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from vilaserve.adapters.offline.demo import shapes

# Shades a person might pick for each name (including the pure RGB primaries); jittered a
# little more per picture.
SHADES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((218, 36, 36), (255, 0, 0), (200, 16, 24), (232, 52, 64), (180, 20, 30)),
    "green": ((34, 160, 52), (0, 128, 0), (0, 200, 40), (60, 200, 60), (0, 240, 0)),
    "blue": ((36, 82, 222), (0, 0, 255), (30, 110, 210), (10, 30, 170), (70, 110, 230)),
    "yellow": ((242, 212, 24), (255, 255, 0), (255, 222, 0), (250, 232, 70), (238, 200, 10)),
    "orange": ((246, 128, 20), (255, 165, 0), (255, 140, 0), (240, 110, 30), (250, 150, 40)),
    "purple": ((138, 48, 178), (128, 0, 128), (150, 60, 210), (110, 36, 150), (160, 80, 190)),
    "black": ((16, 16, 16), (0, 0, 0), (40, 40, 40)),
    "white": ((246, 246, 246), (255, 255, 255), (234, 234, 234)),
}
SMALL_EXTENT = (0.07, 0.28)  # of the short side
BIG_EXTENT = (0.45, 0.95)
ALWAYS_CENTRE = 0.56  # a big shape wider than this cannot be anywhere but the center
# Where a shape's centre lies for each position, as (x range, y range) fractions of the frame.
_REGIONS = {
    "left": ((0.14, 0.34), (0.4, 0.6)),
    "right": ((0.66, 0.86), (0.4, 0.6)),
    "top": ((0.4, 0.6), (0.14, 0.34)),
    "bottom": ((0.4, 0.6), (0.66, 0.86)),
    "center": ((0.44, 0.56), (0.44, 0.56)),
}
_BACKGROUNDS = ("white", "off-white", "pastel", "grey", "muted", "dark")
_BACKGROUND_WEIGHTS = (0.22, 0.22, 0.18, 0.1, 0.1, 0.18)
_FONT_FILES = ("DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
SKETCHED_SHARE = 0.25
PAPER_SHARE = 0.15  # of the light backgrounds
PHOTOGRAPHED_SHARE = 0.25


def generate(seed: int, index: int) -> shapes.DemoExample:
    """The `index`-th everyday-style training example for `seed`."""
    rng = random.Random(f"vilaserve-demo/everyday/{seed}/{index}")
    noise = np.random.default_rng(rng.getrandbits(64))
    # The looks added later draw from a stream of their own, so that the pictures drawn
    # without them stay what they were.
    look = random.Random(f"vilaserve-demo/everyday-look/{seed}/{index}")
    sketched = look.random() < SKETCHED_SHARE
    width, height = _frame(rng)
    kind: shapes.SceneKind = rng.choices(shapes.SCENE_KINDS, weights=(0.5, 0.28, 0.22))[0]
    colour = rng.choice(tuple(shapes.COLOURS))
    fill = _shade(rng, colour)
    background = _background_colour(rng, fill, colour)
    scale = 1 if rng.random() < 0.45 else 3  # aliased, or drawn large and smoothed down
    image = Image.new("RGB", (width * scale, height * scale), background)
    canvas = _Canvas(image, scale, look if sketched else None)
    if look.random() < PAPER_SHARE and _lightness(background) > 0.8:
        _rule_paper(look, ImageDraw.Draw(image), width * scale, height * scale, scale)
    if kind == "single":
        scene = _draw_single(rng, canvas, width, height, colour, fill)
    elif kind == "group":
        scene = _draw_group(rng, canvas, width, height, colour, fill)
    else:
        scene = _draw_word(rng, canvas, width, height, colour, fill)
    picture, mask = image, canvas.mask
    if scale > 1:
        picture = picture.reduce(
            scale
        )  # box-averaged: anti-aliased edges, 10x cheaper than LANCZOS
        mask = mask.resize((width, height), Image.Resampling.NEAREST)
    if look.random() < PHOTOGRAPHED_SHARE:
        picture, mask = _photographed(look, picture, mask)
    picture = _damage(rng, noise, picture)
    if picture.size != mask.size:
        mask = mask.resize(picture.size, Image.Resampling.NEAREST)
    question_kind, question, answer = shapes.ask(rng, scene)
    return shapes.DemoExample(picture, mask, scene, question_kind, question, answer)


# --- frame, colours, background ----------------------------------------------------------------


def _frame(rng: random.Random) -> tuple[int, int]:
    while True:
        width, height = rng.randrange(96, 481, 16), rng.randrange(96, 481, 16)
        if max(width, height) <= 2 * min(width, height):
            return width, height


def _shade(rng: random.Random, colour: str) -> tuple[int, int, int]:
    r, g, b = rng.choice(SHADES[colour])
    spread = 10 if colour in ("black", "white") else 18
    return tuple(max(0, min(255, c + rng.randint(-spread, spread))) for c in (r, g, b))  # type: ignore[return-value]


def _lightness(rgb: tuple[int, int, int]) -> float:
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255


def _background_colour(
    rng: random.Random, fill: tuple[int, int, int], colour: str
) -> tuple[int, int, int]:
    """A plain background the shape stands out on (people do put yellow on white)."""
    for _ in range(100):
        style = rng.choices(_BACKGROUNDS, weights=_BACKGROUND_WEIGHTS)[0]
        if style == "white":
            rgb = (255, 255, 255)
        elif style == "off-white":
            base = rng.randint(236, 252)
            rgb = tuple(min(255, base + rng.randint(-6, 6)) for _ in range(3))  # type: ignore[assignment]
        elif style == "grey":
            level = rng.randint(110, 215)
            rgb = (level, level, level)
        else:
            lightness, saturation = {
                "pastel": (rng.uniform(0.82, 0.95), rng.uniform(0.2, 0.7)),
                "muted": (rng.uniform(0.35, 0.7), rng.uniform(0.04, 0.2)),
                "dark": (rng.uniform(0.05, 0.22), rng.uniform(0.0, 0.5)),
            }[style]
            red, green, blue = colorsys.hls_to_rgb(rng.random(), lightness, saturation)
            rgb = (round(red * 255), round(green * 255), round(blue * 255))
        if _stands_out(fill, rgb, colour):  # type: ignore[arg-type]
            return rgb  # type: ignore[return-value]
    raise RuntimeError(f"no background found for {colour}")  # never: white or dark always fit


def _stands_out(fill: tuple[int, int, int], background: tuple[int, int, int], colour: str) -> bool:
    distance = math.dist(fill, background)
    if colour == "white":
        return _lightness(background) < 0.55 and distance > 120
    if colour == "black":
        return _lightness(background) > 0.4 and distance > 120
    return distance > 110


# --- drawing -----------------------------------------------------------------------------------


class _Canvas:
    """Draws at `scale` times the final size, on the picture and on its object mask."""

    def __init__(self, image: Image.Image, scale: int, sketch: random.Random | None = None) -> None:
        self.scale = scale
        self.sketch = sketch  # draws every shape by hand (wobbly) when set
        self.picture = ImageDraw.Draw(image)
        self.mask = Image.new("L", image.size, 0)
        self._mask = ImageDraw.Draw(self.mask)
        self.objects = 0

    def shape(
        self,
        points: list[tuple[float, float]] | None,
        box: tuple[float, float, float, float] | None,
        fill: tuple[int, int, int],
        line: float,
    ) -> None:
        """A polygon (`points`) or a circle (`box`), filled, or outlined `line` px wide."""
        self.objects += 1
        s = self.scale
        width = max(1, round(line * s)) if line else 0
        if self.sketch is not None:
            self._sketch(points, box, fill, width)
            return
        for draw, paint in ((self.picture, fill), (self._mask, self.objects)):
            if box is not None:
                scaled = (box[0] * s, box[1] * s, box[2] * s, box[3] * s)
                if width:
                    draw.ellipse(scaled, outline=paint, width=width)
                else:
                    draw.ellipse(scaled, fill=paint)
            else:
                scaled_points = [(x * s, y * s) for x, y in points or ()]
                if width:
                    draw.polygon(scaled_points, outline=paint, width=width)
                else:
                    draw.polygon(scaled_points, fill=paint)

    def _sketch(
        self,
        points: list[tuple[float, float]] | None,
        box: tuple[float, float, float, float] | None,
        fill: tuple[int, int, int],
        width: int,
    ) -> None:
        """The shape as a hand draws it: a wobbly closed path; outlines as a stroke that may
        overshoot its start or stop short of it, fills as a wobbly area with, sometimes, a
        stroke of the same colour that does not quite meet it."""
        rng, s = self.sketch, self.scale
        assert rng is not None
        if box is not None:
            centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            radius = (box[2] - box[0]) / 2
            corners = [
                (centre[0] + radius * math.cos(a), centre[1] + radius * math.sin(a))
                for a in np.linspace(0, 2 * math.pi, 40, endpoint=False)
            ]
        else:
            corners = list(points or ())
        extent = max(max(p[0] for p in corners) - min(p[0] for p in corners), 1.0)
        path = [(x * s, y * s) for x, y in _wobbly(rng, corners, 0.025 * extent)]
        if width:
            end = len(path) + rng.randint(-len(path) // 12, len(path) // 8)
            stroke = [path[k % len(path)] for k in range(max(end, 3))]
            self.picture.line(stroke, fill=fill, width=width, joint="curve")
            self._mask.line(stroke, fill=self.objects, width=width, joint="curve")
            return
        self.picture.polygon(path, fill=fill)
        self._mask.polygon(path, fill=self.objects)
        if rng.random() < 0.5:
            edge = [(x * s, y * s) for x, y in _wobbly(rng, corners, 0.03 * extent)]
            line = max(1, round(rng.uniform(0.02, 0.05) * extent * s))
            self.picture.line([*edge, edge[0]], fill=fill, width=line, joint="curve")

    def text(
        self,
        xy: tuple[float, float],
        word: str,
        font: ImageFont.FreeTypeFont,
        fill: tuple[int, ...],
    ) -> None:
        self.objects += 1
        s = self.scale
        self.picture.text((xy[0] * s, xy[1] * s), word, font=font, fill=fill)
        box = self.picture.textbbox((xy[0] * s, xy[1] * s), word, font=font)
        self._mask.rectangle(box, fill=self.objects)


def _unit_outline(rng: random.Random, shape: str) -> list[tuple[float, float]]:
    """The shape's corners, any size, around the origin, before rotation."""
    if shape == "square":
        return [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    if shape == "rectangle":
        long_side = rng.uniform(1.8, 3.2)
        return [(-long_side, -1), (long_side, -1), (long_side, 1), (-long_side, 1)]
    if shape == "triangle":
        variant = rng.random()
        if variant < 0.6:  # equilateral
            return [
                (math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ]
        if variant < 0.8:  # isosceles, its apex between 35 and 80 degrees
            half = math.radians(rng.uniform(35, 80)) / 2
            return [(0.0, -1.0), (2 * math.tan(half), 1.0), (-2 * math.tan(half), 1.0)]
        return [(0.0, 0.0), (rng.uniform(0.8, 1.6), 0.0), (0.0, -1.0)]  # right-angled
    if shape == "star":
        inner = rng.uniform(0.36, 0.5)
        return [
            ((1 if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + k * math.pi / 5),
             (1 if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + k * math.pi / 5))
            for k in range(10)
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def _placed(
    points: Sequence[tuple[float, float]], angle: float, centre: tuple[float, float], extent: float
) -> list[tuple[float, float]]:
    """Rotated, scaled so that its bounding box's longer side is `extent`, centred there."""
    cos, sin = math.cos(angle), math.sin(angle)
    turned = [(x * cos - y * sin, x * sin + y * cos) for x, y in points]
    xs, ys = [p[0] for p in turned], [p[1] for p in turned]
    size = max(max(xs) - min(xs), max(ys) - min(ys))
    mid_x, mid_y = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    factor = extent / size
    return [(centre[0] + (x - mid_x) * factor, centre[1] + (y - mid_y) * factor) for x, y in turned]


def _draw_shape(
    rng: random.Random,
    canvas: _Canvas,
    shape: str,
    centre: tuple[float, float],
    extent: float,
    fill: tuple[int, int, int],
    outlined: bool,
) -> None:
    line = max(1.5, extent * rng.uniform(0.04, 0.12)) if outlined else 0.0
    if shape == "circle":
        radius = extent / 2
        box = (centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius)
        canvas.shape(None, box, fill, line)
        return
    angle = rng.uniform(0, 2 * math.pi)
    canvas.shape(_placed(_unit_outline(rng, shape), angle, centre, extent), None, fill, line)


def _draw_single(
    rng: random.Random,
    canvas: _Canvas,
    width: int,
    height: int,
    colour: str,
    fill: tuple[int, int, int],
) -> shapes.Scene:
    shape, size = rng.choice(shapes.SHAPES), rng.choice(shapes.SIZES)
    share = rng.uniform(*(SMALL_EXTENT if size == "small" else BIG_EXTENT))
    position = "center" if share > ALWAYS_CENTRE else rng.choice(shapes.POSITIONS)
    (x_low, x_high), (y_low, y_high) = _REGIONS[position]
    extent = share * min(width, height)
    # It may touch or cross the border, but at most a tenth of it is cut off: a half circle
    # is not a circle any more.
    inside = 0.4 * extent
    centre = (
        min(max(rng.uniform(x_low, x_high) * width, inside), width - inside),
        min(max(rng.uniform(y_low, y_high) * height, inside), height - inside),
    )
    _draw_shape(rng, canvas, shape, centre, extent, fill, rng.random() < 0.25)
    return shapes.Scene("single", colour, shape=shape, count=1, size=size, position=position)


def _draw_group(
    rng: random.Random,
    canvas: _Canvas,
    width: int,
    height: int,
    colour: str,
    fill: tuple[int, int, int],
) -> shapes.Scene:
    shape, count = rng.choice(shapes.SHAPES), rng.randint(2, shapes.MAX_GROUP)
    placed = shapes.scatter(rng, count, width, height, (0.1, 0.26), 0.55)
    outlined = rng.random() < 0.25  # one person draws a group one way
    for x, y, extent in placed:
        _draw_shape(rng, canvas, shape, (x, y), extent, fill, outlined)
    return shapes.Scene("group", colour, shape=shape, count=count)


@cache
def _font_files() -> tuple[Path, ...]:
    """TrueType fonts beside PIL's own: matplotlib's DejaVu files (a dev dependency)."""
    import matplotlib

    folder = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    return tuple(folder / name for name in _FONT_FILES)


def _font(rng: random.Random, size: int) -> ImageFont.FreeTypeFont:
    choice = rng.randrange(len(_FONT_FILES) + 1)
    if choice == 0:
        return ImageFont.load_default(size=size)  # type: ignore[return-value]
    return ImageFont.truetype(str(_font_files()[choice - 1]), size=size)


def _draw_word(
    rng: random.Random,
    canvas: _Canvas,
    width: int,
    height: int,
    colour: str,
    fill: tuple[int, int, int],
) -> shapes.Scene:
    word = rng.choice(shapes.WORDS)
    s = canvas.scale
    size = round(min(height, width) * rng.uniform(0.22, 0.4) * s)
    font = _font(rng, size)
    left, top, right, bottom = canvas.picture.textbbox((0, 0), word, font=font)
    if right - left > 0.9 * width * s:  # too wide for the frame: shrink to fit
        font = _font(rng, int(size * 0.9 * width * s / (right - left)))
        left, top, right, bottom = canvas.picture.textbbox((0, 0), word, font=font)
    w, h = (right - left) / s, (bottom - top) / s
    x = rng.uniform(0.05 * width, max(0.05 * width, 0.95 * width - w)) - left / s
    y = rng.uniform(0.05 * height, max(0.05 * height, 0.95 * height - h)) - top / s
    canvas.text((x, y), word, font, fill)
    return shapes.Scene("word", colour, word=word)


def _wobbly(
    rng: random.Random, corners: Sequence[tuple[float, float]], amplitude: float
) -> list[tuple[float, float]]:
    """The closed outline through `corners`, cut into short pieces displaced across it by a
    smooth noise (a few low-frequency waves): a hand's wobble, not a jagged edge."""
    pieces: list[tuple[float, float]] = []
    for k, (x0, y0) in enumerate(corners):
        x1, y1 = corners[(k + 1) % len(corners)]
        steps = max(2, round(math.dist((x0, y0), (x1, y1)) / max(amplitude, 0.5)))
        pieces += [(x0 + (x1 - x0) * t / steps, y0 + (y1 - y0) * t / steps) for t in range(steps)]
    waves = [(rng.randint(1, 4), rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 1.0)) for _ in "abc"]
    cx = sum(p[0] for p in corners) / len(corners)
    cy = sum(p[1] for p in corners) / len(corners)
    out = []
    for k, (x, y) in enumerate(pieces):
        t = 2 * math.pi * k / len(pieces)
        push = amplitude * sum(w * math.sin(f * t + p) for f, p, w in waves) / 1.5
        length = math.hypot(x - cx, y - cy) or 1.0
        out.append((x + push * (x - cx) / length, y + push * (y - cy) / length))
    return out


def _rule_paper(
    rng: random.Random, draw: ImageDraw.ImageDraw, width: int, height: int, scale: int
) -> None:
    """Faint ruled or squared paper lines across the whole sheet."""
    shade = rng.choice(((200, 215, 240), (215, 215, 215), (190, 210, 235)))
    gap = rng.randint(12, 24) * scale
    line = max(1, scale // 2)
    for y in range(gap, height, gap):
        draw.line([(0, y), (width, y)], fill=shade, width=line)
    if rng.random() < 0.4:
        for x in range(gap, width, gap):
            draw.line([(x, 0), (x, height)], fill=shade, width=line)


def _photographed(
    rng: random.Random, picture: Image.Image, mask: Image.Image
) -> tuple[Image.Image, Image.Image]:
    """The sheet photographed: turned by a few degrees (the table shows in the corners),
    lit unevenly (a smooth brightness slope and a vignette) under a warm or cool light."""
    angle = rng.uniform(-5, 5)
    table = tuple(rng.randint(60, 160) for _ in range(3))
    picture = picture.rotate(angle, Image.Resampling.BILINEAR, fillcolor=table)  # type: ignore[arg-type]
    mask = mask.rotate(angle, Image.Resampling.NEAREST, fillcolor=0)
    width, height = picture.size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs, ys = xs / width - 0.5, ys / height - 0.5
    direction = rng.uniform(0, 2 * math.pi)
    slope = rng.uniform(0.1, 0.3) * (math.cos(direction) * xs + math.sin(direction) * ys)
    vignette = rng.uniform(0.0, 0.35) * (xs**2 + ys**2)
    light = 1.0 + slope - vignette
    cast = np.array(rng.choice(((1.04, 1.0, 0.92), (0.94, 0.98, 1.05), (1.0, 1.0, 1.0))))
    pixels = np.asarray(picture, dtype=np.float32) * light[..., None] * cast
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), mask


# --- photographic damage -----------------------------------------------------------------------


def _damage(rng: random.Random, noise: np.random.Generator, picture: Image.Image) -> Image.Image:
    """Blur, sensor noise, down-scaling and JPEG, each on a share of the pictures."""
    if rng.random() < 0.15:
        picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    if rng.random() < 0.3:
        pixels = np.asarray(picture, dtype=np.float32)
        pixels = pixels + noise.normal(0.0, rng.uniform(2.0, 12.0), pixels.shape)
        picture = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.2:
        factor = rng.uniform(0.5, 0.85)
        size = (max(48, round(picture.width * factor)), max(48, round(picture.height * factor)))
        picture = picture.resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.35:
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=rng.randint(15, 90))
        picture = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return picture
