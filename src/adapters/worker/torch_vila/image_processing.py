"""Image decoding and VILA-style preprocessing, implemented with PIL + numpy.

Why not transformers' image processors: in transformers v5 the default (fast) processors need
torchvision, which a serving box may not have, and the PIL fallback logs a warning per load. The
steps are few and fully specified by `preprocessor_config.json`, so we reproduce them here and
check them against transformers' PIL backend in the tests.

The order of operations follows VILA's `process_image`: convert to RGB, then the aspect-ratio
step (`resize`: squash to the processor size; `pad`: expand to a square filled with the mean
colour), then the processor proper (resize, center crop, rescale, normalize).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# Defaults used when preprocessor_config.json omits mean/std; they are the transformers defaults
# of the respective processor classes (SigLIP uses 0.5, CLIP the OpenAI statistics).
_HALF_MEAN_STD = (0.5, 0.5, 0.5)
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Only formats that browsers and chat clients actually send. Restricting the decoder list keeps
# exotic parsers (EPS invokes Ghostscript, for instance) away from untrusted bytes. Multi-picture
# JPEGs from phones (MPO) are opened by the JPEG plugin.
ALLOWED_IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

# Aspect-ratio modes of VILA's root config. "square" (LLaVA's name for "no extra step") is
# accepted too; VILA-2/NVILA's dynamic tiling modes are not implemented.
SUPPORTED_ASPECT_RATIOS: tuple[str, ...] = ("resize", "pad", "square")


def _as_hw(value: Any, field: str) -> tuple[int, int]:
    """Reads a square int or a {"height", "width"} dict as (height, width)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, Mapping) and "height" in value and "width" in value:
        return (int(value["height"]), int(value["width"]))
    raise ValueError(f"preprocessor config: cannot read {field}={value!r} as a height/width size")


def _floats3(value: Any, field: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"preprocessor config: {field} must have 3 values, got {value!r}")
    return (values[0], values[1], values[2])


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The subset of a transformers `preprocessor_config.json` that SigLIP/CLIP use.

    Exactly one of `size` (resize to height x width) and `shortest_edge` (resize the shorter side,
    keep the aspect ratio) is set when `do_resize` is true.
    """

    do_resize: bool = True
    size: tuple[int, int] | None = None
    shortest_edge: int | None = None
    resample: int = int(Image.Resampling.BICUBIC)
    do_center_crop: bool = False
    crop_size: tuple[int, int] | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = _HALF_MEAN_STD
    image_std: tuple[float, float, float] = _HALF_MEAN_STD
    processor_type: str | None = None

    def __post_init__(self) -> None:
        if self.do_resize and (self.size is None) == (self.shortest_edge is None):
            raise ValueError(
                "preprocessor config: do_resize needs exactly one of size(height,width) "
                "and shortest_edge"
            )
        if self.do_center_crop and self.crop_size is None:
            raise ValueError("preprocessor config: do_center_crop is set but crop_size is missing")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"preprocessor config: image_std must be positive: {self.image_std}")
        # Fail at load time, not on the first request, if the batch shape would vary per image.
        _ = self.output_size

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of every processed image; the vision tower needs a fixed size."""
        if self.do_center_crop and self.crop_size is not None:
            return self.crop_size
        if self.do_resize and self.size is not None:
            return self.size
        raise ValueError(
            "preprocessor config gives no fixed output size (needs a center crop or a "
            "height/width resize)"
        )

    @classmethod
    def from_json(cls, path: Path | str) -> ImageProcessorConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read preprocessor config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"preprocessor config {path} is not a JSON object")
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageProcessorConfig:
        # Older repos (openai/clip-vit-large-patch14-336, which LLaVA-1.5 names) only carry
        # the feature-extractor name.
        processor_type = data.get("image_processor_type") or data.get("feature_extractor_type")
        # transformers' CLIP processor reads a bare int `size` as the shortest edge
        # (default_to_square=False); SigLIP and most others read it as a square.
        int_size_is_shortest_edge = bool(processor_type) and str(processor_type).startswith("CLIP")
        is_clip = int_size_is_shortest_edge

        do_resize = bool(data.get("do_resize", True))
        size: tuple[int, int] | None = None
        shortest_edge: int | None = None
        raw_size = data.get("size")
        if isinstance(raw_size, Mapping) and "shortest_edge" in raw_size:
            shortest_edge = int(raw_size["shortest_edge"])
        elif isinstance(raw_size, int) and int_size_is_shortest_edge:
            shortest_edge = raw_size
        elif raw_size is not None:
            size = _as_hw(raw_size, "size")

        do_center_crop = bool(data.get("do_center_crop", False))
        raw_crop = data.get("crop_size")
        crop_size = _as_hw(raw_crop, "crop_size") if raw_crop is not None else None

        default_mean = _OPENAI_CLIP_MEAN if is_clip else _HALF_MEAN_STD
        default_std = _OPENAI_CLIP_STD if is_clip else _HALF_MEAN_STD
        return cls(
            do_resize=do_resize,
            size=size,
            shortest_edge=shortest_edge,
            resample=int(data.get("resample", int(Image.Resampling.BICUBIC))),
            do_center_crop=do_center_crop,
            crop_size=crop_size,
            do_rescale=bool(data.get("do_rescale", True)),
            rescale_factor=float(data.get("rescale_factor", 1 / 255)),
            do_normalize=bool(data.get("do_normalize", True)),
            image_mean=_floats3(data.get("image_mean", default_mean), "image_mean"),
            image_std=_floats3(data.get("image_std", default_std), "image_std"),
            processor_type=str(processor_type) if processor_type else None,
        )


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pads the short side so the image is square, with the original centred (VILA `pad`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crops an HWC array around its centre, zero-padding when it is smaller than the crop.

    Offsets are floor((orig - crop) / 2), which is what transformers uses for both the crop and
    (as ceil of the negated value) the padding, so results match it bit for bit.
    """
    orig_h, orig_w = array.shape[:2]
    top = (orig_h - height) // 2
    left = (orig_w - width) // 2
    if top >= 0 and left >= 0:
        return array[top : top + height, left : left + width]
    out = np.zeros((max(height, orig_h), max(width, orig_w), array.shape[2]), dtype=array.dtype)
    pad_top, pad_left = max(0, -top), max(0, -left)
    out[pad_top : pad_top + orig_h, pad_left : pad_left + orig_w] = array
    top, left = max(0, top), max(0, left)
    return out[top : top + height, left : left + width]


class ImagePreprocessor:
    """Turns PIL images into the float32 pixel batch [N, 3, H, W] the vision tower expects."""

    def __init__(self, config: ImageProcessorConfig, aspect_ratio: str) -> None:
        if aspect_ratio not in SUPPORTED_ASPECT_RATIOS:
            raise ValueError(
                f"image_aspect_ratio {aspect_ratio!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ASPECT_RATIOS)})"
            )
        self.config = config
        self.aspect_ratio = aspect_ratio
        self.output_size = config.output_size
        # VILA computes the pad colour as int(255 * mean), truncating, not rounding.
        self._pad_color = (
            int(255 * config.image_mean[0]),
            int(255 * config.image_mean[1]),
            int(255 * config.image_mean[2]),
        )
        self._mean = np.asarray(config.image_mean, dtype=np.float32)
        self._std = np.asarray(config.image_std, dtype=np.float32)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        height, width = self.output_size
        if not images:
            return torch.empty((0, 3, height, width), dtype=torch.float32)
        arrays = [self._process_one(image) for image in images]
        return torch.from_numpy(np.stack(arrays))

    def _squash_size(self) -> tuple[int, int]:
        """(width, height) for the `resize` aspect step: VILA uses crop_size, else size."""
        cfg = self.config
        if cfg.crop_size is not None:
            h, w = cfg.crop_size
        elif cfg.size is not None:
            h, w = cfg.size
        else:
            h, w = self.output_size
        return (w, h)

    def _resize_target(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) of the processor's resize step."""
        cfg = self.config
        if cfg.size is not None:
            return (cfg.size[1], cfg.size[0])
        assert cfg.shortest_edge is not None  # guaranteed by ImageProcessorConfig
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        # int() truncation mirrors transformers' get_resize_output_image_size.
        new_long = int(cfg.shortest_edge * long / short)
        if width <= height:
            return (cfg.shortest_edge, new_long)
        return (new_long, cfg.shortest_edge)

    def _process_one(self, image: Image.Image) -> np.ndarray:
        cfg = self.config
        image = image.convert("RGB") if image.mode != "RGB" else image
        if self.aspect_ratio == "resize":
            # PIL's default filter for RGB is bicubic, which is what VILA's bare resize() used.
            image = image.resize(self._squash_size(), Image.Resampling.BICUBIC)
        elif self.aspect_ratio == "pad":
            image = expand_to_square(image, self._pad_color)

        if cfg.do_resize:
            target = self._resize_target(image)
            if target != image.size:
                image = image.resize(target, Image.Resampling(cfg.resample))

        array = np.asarray(image)
        if cfg.do_center_crop and cfg.crop_size is not None:
            array = _center_crop(array, *cfg.crop_size)

        # transformers rescales in float64 and then casts, and normalizes in float32; matching
        # that keeps us bit-identical with its PIL backend.
        pixels = (
            (array.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
            if cfg.do_rescale
            else array.astype(np.float32)
        )
        if cfg.do_normalize:
            pixels = (pixels - self._mean) / self._std
        if pixels.shape[:2] != self.output_size:
            raise ValueError(
                f"preprocessed image is {pixels.shape[:2]}, expected {self.output_size}; "
                "check the preprocessor config"
            )
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _available_formats() -> list[str]:
    """The allowed formats this Pillow build can open (Image.open fails on unknown names)."""
    Image.init()
    return [name for name in ALLOWED_IMAGE_FORMATS if name in Image.OPEN]


def _open(data: bytes) -> Image.Image:
    """The image with only its header read; ValueError naming why it cannot be."""
    try:
        return Image.open(io.BytesIO(data), formats=_available_formats())
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image is too large to decode: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # UnidentifiedImageError is an OSError; some plugins raise SyntaxError on bad headers.
        raise ValueError(
            "image payload is not a decodable image "
            f"(supported formats: {', '.join(ALLOWED_IMAGE_FORMATS)})"
        ) from exc


def image_pixels(data: bytes) -> int:
    """width x height from the header alone (nothing decoded); ValueError if unreadable."""
    with _open(data) as image:
        width, height = image.size
    return int(width) * int(height)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decodes untrusted image bytes into an RGB PIL image, or raises ValueError.

    The pixel count is checked from the header, before the (possibly huge) pixel data is
    decoded, so a small compressed payload cannot make us allocate gigabytes.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if not data:
        raise ValueError("image payload is empty")
    with _open(data) as image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ValueError(f"image has an invalid size {width}x{height}")
        if width * height > max_pixels:
            raise ValueError(
                f"image is {width}x{height} = {width * height} pixels, "
                f"more than the limit of {max_pixels}"
            )
        try:
            image.load()
            # Converting also detaches the result from the BytesIO-backed file object.
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"image payload is corrupt or truncated: {exc}") from exc
