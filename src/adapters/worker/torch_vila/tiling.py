"""NVILA image tiling (dynamic S2 and InternVL-style dynamic tiles) and its feature assembly.

Grids are written two ways, as in VILA: an aspect-ratio candidate is (cols, rows), because it is
compared with width / height; a `block_size` is (rows, cols), the order the chessboard helpers
take. Both PIL steps resize with bicubic, Pillow's default for RGB images, which is what VILA
gets from a bare `image.resize(...)`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from PIL import Image

from vilaserve.adapters.worker.torch_vila.s2 import (
    area_resize,
    grid_to_tokens,
    merge_chessboard,
    split_chessboard,
    tokens_to_grid,
)

Grid = tuple[int, int]


@functools.lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[Grid, ...]:
    """(cols, rows) with min_tiles <= cols*rows <= max_tiles, in increasing tile count.

    Within one tile count the order is the iteration order of a Python set filled in VILA's
    loop order (n, then cols, then rows). It decides exact ties in `find_closest_aspect_ratio`,
    so the set is built the same way rather than tidied.
    """
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles} and {max_tiles}")
    grids = {
        (cols, rows)
        for n in range(min_tiles, max_tiles + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_tiles <= cols * rows <= max_tiles
    }
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def find_closest_aspect_ratio(
    aspect_ratio: float, candidates: Sequence[Grid], width: int, height: int, image_size: int
) -> Grid:
    """The (cols, rows) whose cols/rows is closest to `aspect_ratio`.

    On an exact tie a later candidate (more tiles, given `candidate_grids`' order) replaces the
    current best only when the image has more than half the pixels that grid would hold.
    """
    best = (1, 1)
    best_diff = float("inf")
    area = width * height
    for cols, rows in candidates:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_block_size(
    width: int, height: int, image_size: int, min_tiles: int, max_tiles: int
) -> Grid:
    """(rows, cols) of the tile grid chosen for a width x height image."""
    cols, rows = find_closest_aspect_ratio(
        width / height, candidate_grids(min_tiles, max_tiles), width, height, image_size
    )
    return rows, cols


def dynamic_s2_block_size(
    width: int, height: int, image_size: int, scales: Sequence[int], max_tiles: int = 12
) -> Grid:
    """(rows, cols) of the last scale's grid: at least (last / first scale)^2 tiles."""
    min_tiles = (scales[-1] // scales[0]) ** 2
    return dynamic_block_size(width, height, image_size, min_tiles, max_tiles)


def _cut(image: Image.Image, image_size: int, rows: int, cols: int) -> list[Image.Image]:
    """Resize to (cols, rows) tiles of image_size and cut them out row-major."""
    resized = image.resize((cols * image_size, rows * image_size), Image.Resampling.BICUBIC)
    return [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def dynamic_s2_tiles(
    image: Image.Image, image_size: int, scales: Sequence[int], max_tiles: int = 12
) -> tuple[list[Image.Image], Grid]:
    """NVILA-8B single-image tiling: returns the tiles and the last scale's (rows, cols).

    Every scale but the last squashes the whole image to a (s / first scale)-tile square; the
    last keeps the aspect ratio as well as its grid allows. No thumbnail.
    """
    image = _rgb(image)
    tiles: list[Image.Image] = []
    for scale in scales[:-1]:
        side = scale // scales[0]
        tiles += _cut(image, image_size, side, side)
    rows, cols = dynamic_s2_block_size(image.width, image.height, image_size, scales, max_tiles)
    tiles += _cut(image, image_size, rows, cols)
    return tiles, (rows, cols)


def dynamic_tiles(
    image: Image.Image,
    image_size: int,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """NVILA-Lite single-image tiling: grid tiles row-major, then a whole-image thumbnail when
    there is more than one tile."""
    image = _rgb(image)
    rows, cols = dynamic_block_size(image.width, image.height, image_size, min_tiles, max_tiles)
    tiles = _cut(image, image_size, rows, cols)
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def dynamic_s2_token_count(
    width: int,
    height: int,
    image_size: int,
    scales: Sequence[int],
    max_tiles: int,
    tokens_per_tile_after_projector: int,
    end_tokens: int = 1,
) -> int:
    """LLM positions for one dynamic-S2 image: 256 * rows * cols + 1 ("\\n") for NVILA-8B."""
    rows, cols = dynamic_s2_block_size(width, height, image_size, scales, max_tiles)
    return tokens_per_tile_after_projector * rows * cols + end_tokens


def dynamic_tile_token_count(
    width: int,
    height: int,
    image_size: int,
    min_tiles: int = 1,
    max_tiles: int = 12,
    positions_per_tile: int = 123,
    use_thumbnail: bool = True,
) -> int:
    """LLM positions for one NVILA-Lite image: per tile (thumbnail included) 121 projector
    tokens + the encoder's "\\n" embedding + a literal "\\n" token = 123 at 448 px."""
    rows, cols = dynamic_block_size(width, height, image_size, min_tiles, max_tiles)
    tiles = rows * cols + (1 if use_thumbnail and rows * cols != 1 else 0)
    return positions_per_tile * tiles


def output_block_size(block_size: Grid, scales: Sequence[int], resize_idx: int = -1) -> Grid:
    """(rows, cols) of projector tiles after `merge_features_for_dynamic_s2`."""
    if scales[resize_idx] == scales[-1]:
        return block_size
    side = scales[resize_idx] // scales[0]
    return side, side


def merge_features_for_dynamic_s2(
    features: torch.Tensor, block_size: Grid, scales: Sequence[int], resize_idx: int = -1
) -> torch.Tensor:
    """Tower features of one image's dynamic-S2 tiles -> per-tile multi-scale features.

    features: [n_tiles, T, C], the tiles in `dynamic_s2_tiles` order. Each scale's tiles are
    stitched into one map, every map is area-resized (float32) to the grid of
    `scales[resize_idx]`, the maps are concatenated along channels in ascending-scale order and
    cut again into that scale's tiles: [tiles, T, C * len(scales)], tiles row-major over
    `output_block_size(...)` (the last scale's (rows, cols) for NVILA's resize_idx -1).
    """
    rows, cols = block_size
    sides = [scale // scales[0] for scale in scales[:-1]]
    expected = sum(side * side for side in sides) + rows * cols
    if features.shape[0] != expected:
        raise ValueError(
            f"{features.shape[0]} tiles given, scales {tuple(scales)} with a {rows}x{cols} "
            f"last-scale grid make {expected}"
        )
    maps = []
    start = 0
    for side in sides:
        maps.append(merge_chessboard(tokens_to_grid(features[start : start + side * side]), side))
        start += side * side
    maps.append(merge_chessboard(tokens_to_grid(features[start:]), rows, cols))
    size = (maps[resize_idx].shape[-2], maps[resize_idx].shape[-1])
    merged = torch.cat([area_resize(feature_map, size) for feature_map in maps], dim=1)
    out_rows, out_cols = output_block_size(block_size, scales, resize_idx)
    return grid_to_tokens(split_chessboard(merged, out_rows, out_cols))


def merge_tile_tokens(projected: torch.Tensor, block_size: Grid) -> torch.Tensor:
    """[rows*cols, t, H] projected tiles -> [rows*cols*t, H], row-major over the whole image.

    Each tile's t tokens are a sqrt(t) x sqrt(t) grid; the tiles sit row-major on the board.
    """
    rows, cols = block_size
    n_tiles, tokens, hidden = projected.shape
    if n_tiles != rows * cols:
        raise ValueError(f"{n_tiles} projected tiles for a {rows}x{cols} grid")
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"expected a square token grid per tile, got {tokens} tokens")
    # [tile_row, tile_col, r, c, H] -> [tile_row, r, tile_col, c, H]: image rows outermost.
    board = projected.reshape(rows, cols, side, side, hidden).permute(0, 2, 1, 3, 4)
    return board.reshape(n_tiles * tokens, hidden)


def repeat_for_scales(features: torch.Tensor, n_scales: int) -> torch.Tensor:
    """Several images (or video frames): untiled [N, T, C] -> [N, T, C * n_scales].

    NVILA's projector expects multi-scale width, so the single-scale map is repeated along
    channels and treated as a 1x1 block.
    """
    return features.repeat(1, 1, n_scales)
