"""S2 ("scaling on scales") multi-scale vision features, as VILA1.5-*-s2 checkpoints use them.

One image is seen at several square scales. Each scale is cut into tiles of the tower's own input
size (a "chessboard"), all tiles of a scale go through the tower in one batch, the tiles' token
grids are stitched back into one feature map per scale, every map is area-resized to one common
grid, and the maps are concatenated along channels. The projector then sees C x len(scales)
channels per token, with as many tokens as the chosen scale's grid.

The chessboard helpers are shared with NVILA's dynamic-S2 path (tiling.py), which needs
non-square boards; the tile order everywhere is row-major with the image index innermost:
tile (i, j) of image b sits at batch index (i * cols + j) * B + b.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def split_chessboard(x: torch.Tensor, rows: int, cols: int | None = None) -> torch.Tensor:
    """[B, C, H, W] -> [rows*cols*B, C, H/rows, W/cols], tile (i, j) of image b at (i*cols+j)*B+b.

    `cols` defaults to `rows` (a square board, as fixed S2 uses).
    """
    cols = rows if cols is None else cols
    batch, channels, height, width = x.shape
    if height % rows or width % cols:
        raise ValueError(f"cannot cut a {height}x{width} map into {rows}x{cols} equal tiles")
    tile_h, tile_w = height // rows, width // cols
    tiles = x.reshape(batch, channels, rows, tile_h, cols, tile_w).permute(2, 4, 0, 1, 3, 5)
    return tiles.reshape(rows * cols * batch, channels, tile_h, tile_w)


def merge_chessboard(x: torch.Tensor, rows: int, cols: int | None = None) -> torch.Tensor:
    """Inverse of `split_chessboard`: [rows*cols*B, C, h, w] -> [B, C, rows*h, cols*w]."""
    cols = rows if cols is None else cols
    n_tiles, channels, tile_h, tile_w = x.shape
    if n_tiles % (rows * cols):
        raise ValueError(f"{n_tiles} tiles do not make whole {rows}x{cols} boards")
    batch = n_tiles // (rows * cols)
    board = x.reshape(rows, cols, batch, channels, tile_h, tile_w).permute(2, 3, 0, 4, 1, 5)
    return board.reshape(batch, channels, rows * tile_h, cols * tile_w)


def tokens_to_grid(features: torch.Tensor) -> torch.Tensor:
    """[N, T, C] with T = g*g (token t at row t // g, column t % g) -> [N, C, g, g]."""
    n, tokens, channels = features.shape
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"expected a square token grid, got {tokens} tokens")
    return features.transpose(1, 2).reshape(n, channels, side, side)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, H*W, C], tokens row-major."""
    n, channels, height, width = grid.shape
    return grid.reshape(n, channels, height * width).transpose(1, 2)


def area_resize(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`F.interpolate(mode="area")` in float32 and back, as VILA does for every scale.

    Area mode is adaptive average pooling: exact block means when shrinking by an integer
    factor, copies/overlapping means when growing. Same size is an exact identity, so skip it.
    """
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    return F.interpolate(grid.float(), size=size, mode="area").to(grid.dtype)


def parse_s2_scales(value: Any, field: str = "s2_scales") -> tuple[int, ...]:
    """`"384,768"` (or a list of ints) -> ascending tuple, as VILA sorts the scales at load."""
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        scales = tuple(sorted(int(part) for part in parts))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field} must be a comma-separated list of sizes, got {value!r}") from exc
    if not scales or scales[0] <= 0:
        raise ValueError(f"{field} must list positive sizes, got {value!r}")
    return scales


class S2Tower(nn.Module):
    """Fixed S2 around a single-scale tower: [B, 3, L, L] -> [B, g*g, C * len(scales)].

    `tower`: any module mapping [N, 3, S, S] pixels to [N, T, C] features on a square token grid,
    with attributes `image_size` (S), `hidden_size` (C), `dtype` and method `output_tokens()` (T).
    L is the largest scale; the output grid g x g is that of `scales[resize_output_to_scale_idx]`.
    """

    def __init__(
        self,
        tower: nn.Module,
        scales: Sequence[int],
        max_split_size: int,
        resize_output_to_scale_idx: int = 0,
    ) -> None:
        super().__init__()
        self.scales = parse_s2_scales(scales)
        if max_split_size <= 0:
            raise ValueError(f"s2_max_split_size must be positive, got {max_split_size}")
        count = len(self.scales)
        if not -count <= resize_output_to_scale_idx < count:
            raise ValueError(
                f"s2_resize_output_to_scale_idx {resize_output_to_scale_idx} is out of range "
                f"for {count} scales"
            )
        tile_size = int(tower.image_size)
        # Each scale is cut into ceil(s / max_split)^2 tiles; the tower has a fixed input size
        # (its position embeddings do not stretch), so every tile must be exactly that size.
        self.splits = tuple(math.ceil(scale / max_split_size) for scale in self.scales)
        for scale, split in zip(self.scales, self.splits, strict=True):
            if scale % split or scale // split != tile_size:
                raise ValueError(
                    f"s2_scales entry {scale} with s2_max_split_size {max_split_size} gives "
                    f"{split}x{split} tiles of {scale / split:g} pixels, but the vision tower "
                    f"takes {tile_size}x{tile_size} images"
                )
        tile_tokens = int(tower.output_tokens())
        self.tile_grid = math.isqrt(tile_tokens)
        if self.tile_grid * self.tile_grid != tile_tokens:
            raise ValueError(
                f"S2 needs a square token grid per tile, the tower emits {tile_tokens} tokens"
            )
        self.tower = tower
        self.max_split_size = max_split_size
        self.resize_output_to_scale_idx = resize_output_to_scale_idx
        self.image_size = self.scales[-1]
        self.hidden_size = int(tower.hidden_size) * count
        self.output_grid = self.tile_grid * self.splits[resize_output_to_scale_idx]

    @classmethod
    def from_root_config(cls, tower: nn.Module, root_config: Mapping[str, Any]) -> S2Tower:
        """From the root config's `s2_scales`, `s2_max_split_size` and
        `s2_resize_output_to_scale_idx` (absent -> 0, as in VILA-1.5)."""
        for field in ("s2_scales", "s2_max_split_size"):
            if field not in root_config:
                raise ValueError(f"an S2 checkpoint's root config needs the field {field!r}")
        try:
            max_split = int(root_config["s2_max_split_size"])
            resize_idx = int(root_config.get("s2_resize_output_to_scale_idx", 0))
        except (TypeError, ValueError) as exc:
            raise ValueError(
                "s2_max_split_size and s2_resize_output_to_scale_idx must be integers"
            ) from exc
        return cls(tower, parse_s2_scales(root_config["s2_scales"]), max_split, resize_idx)

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.dtype

    @property
    def tiles_per_image(self) -> int:
        """Tower inputs per image, all scales together (5 for VILA1.5-3b-s2)."""
        return sum(split * split for split in self.splits)

    def output_tokens(self) -> int:
        return self.output_grid * self.output_grid

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"S2 expects {self.image_size}x{self.image_size} pixels (the largest scale), "
                f"got {tuple(pixels.shape[-2:])}"
            )
        maps = []
        for scale, split in zip(self.scales, self.splits, strict=True):
            scaled = pixels
            if scale != self.image_size:
                # Bicubic in float32 without antialias, then back to the input dtype (s2wrapper).
                scaled = F.interpolate(
                    pixels.float(), size=(scale, scale), mode="bicubic", align_corners=False
                ).to(pixels.dtype)
            features = self.tower(split_chessboard(scaled, split))
            maps.append(merge_chessboard(tokens_to_grid(features), split))
        size = (self.output_grid, self.output_grid)
        merged = torch.cat([area_resize(feature_map, size) for feature_map in maps], dim=1)
        return grid_to_tokens(merged)
