"""S2 multi-scale towers, NVILA tiling and NVILA feature assembly.

References are written out plainly here from the rules in the shared reference
(`vila-family-layouts.md` §2.2, §4.5-4.7): explicit loops over scales, tiles and token positions,
area resizing as the adaptive-average-pooling formula, and hand-worked tile grids with their
arithmetic in comments. None of them calls the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from vilaserve.adapters.worker.torch_vila.projector import build_projector
from vilaserve.adapters.worker.torch_vila.s2 import (
    S2Tower,
    merge_chessboard,
    parse_s2_scales,
    split_chessboard,
)
from vilaserve.adapters.worker.torch_vila.tiling import (
    dynamic_block_size,
    dynamic_s2_block_size,
    dynamic_s2_tiles,
    dynamic_s2_token_count,
    dynamic_tile_token_count,
    dynamic_tiles,
    find_closest_aspect_ratio,
    merge_features_for_dynamic_s2,
    merge_tile_tokens,
    output_block_size,
    repeat_for_scales,
)
from vilaserve.adapters.worker.torch_vila.vision_tower import VisionTower

NVILA_SCALES = (448, 896, 1344)


# ---------------------------------------------------------------- plain reference helpers


def area_resize_reference(grid: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """[C, H, W] -> [C, out_h, out_w]: adaptive average pooling written out. Output cell (o, p)
    averages input rows floor(o*H/out_h) .. ceil((o+1)*H/out_h)-1, likewise columns."""
    channels, height, width = grid.shape
    out = torch.empty(channels, out_h, out_w, dtype=torch.float64)
    for o in range(out_h):
        r0, r1 = (o * height) // out_h, -((-(o + 1) * height) // out_h)
        for p in range(out_w):
            c0, c1 = (p * width) // out_w, -((-(p + 1) * width) // out_w)
            out[:, o, p] = grid[:, r0:r1, c0:c1].double().mean(dim=(1, 2))
    return out


def place_tile_tokens(tiles: list[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """Tiles' [T, C] tokens (row-major tile list; token t at (t // g, t % g) in its tile)
    -> one [C, rows*g, cols*g] board."""
    tokens, channels = tiles[0].shape
    g = math.isqrt(tokens)
    board = torch.empty(channels, rows * g, cols * g, dtype=tiles[0].dtype)
    for index, tile in enumerate(tiles):
        i, j = divmod(index, cols)
        for t in range(tokens):
            board[:, i * g + t // g, j * g + t % g] = tile[t]
    return board


def board_to_tokens(board: torch.Tensor) -> torch.Tensor:
    """[C, H, W] -> [H*W, C], token r*W + c = pixel (r, c)."""
    channels, height, width = board.shape
    out = torch.empty(height * width, channels, dtype=board.dtype)
    for r in range(height):
        for c in range(width):
            out[r * width + c] = board[:, r, c]
    return out


# ---------------------------------------------------------------- chessboard


def test_split_chessboard_tile_order_by_hand() -> None:
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 1, 4, 6)
    tiles = split_chessboard(x, 2, 3)
    assert tiles.shape == (12, 1, 2, 2)
    # Index (i*3 + j)*2 + b: index 1 is image 1's tile (0, 0); index 2 image 0's tile (0, 1);
    # index 6 image 0's tile (1, 0).
    assert tiles[0, 0].tolist() == [[0, 1], [6, 7]]
    assert tiles[1, 0].tolist() == [[24, 25], [30, 31]]
    assert tiles[2, 0].tolist() == [[2, 3], [8, 9]]
    assert tiles[6, 0].tolist() == [[12, 13], [18, 19]]
    for i in range(2):
        for j in range(3):
            for b in range(2):
                expected = x[b, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
                assert torch.equal(tiles[(i * 3 + j) * 2 + b], expected)


def test_chessboard_round_trip_square_and_rectangular() -> None:
    x = torch.randn(3, 5, 12, 12)
    assert torch.equal(merge_chessboard(split_chessboard(x, 3), 3), x)
    assert split_chessboard(x, 3).shape == (27, 5, 4, 4)
    assert torch.equal(merge_chessboard(split_chessboard(x, 2, 4), 2, 4), x)
    tiles = torch.randn(8, 2, 3, 3)
    assert torch.equal(split_chessboard(merge_chessboard(tiles, 2, 2), 2, 2), tiles)
    with pytest.raises(ValueError, match="5x5"):
        split_chessboard(torch.zeros(1, 1, 12, 12), 5)


# ---------------------------------------------------------------- fixed S2 (VILA1.5-3b-s2)


def tiny_tower() -> VisionTower:
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    return VisionTower(SiglipVisionModel(cfg), select_layer=-2, select_feature="cls_patch").eval()


def s2_reference(
    tower: VisionTower, pixels: torch.Tensor, scales: list[int], split: int, resize_idx: int
) -> torch.Tensor:
    """§2.2 steps 3-7 for each image separately, one tile at a time."""
    outputs = []
    for b in range(pixels.shape[0]):
        boards = []
        for s in scales:
            n = math.ceil(s / split)
            x = F.interpolate(pixels[b : b + 1].float(), size=s, mode="bicubic")
            tile = s // n
            tiles = []
            for i in range(n):
                for j in range(n):
                    crop = x[:, :, i * tile : (i + 1) * tile, j * tile : (j + 1) * tile]
                    tiles.append(tower(crop)[0])
            boards.append(place_tile_tokens(tiles, n, n))
        side = boards[resize_idx].shape[-1]
        resized = [area_resize_reference(board, side, side) for board in boards]
        outputs.append(board_to_tokens(torch.cat(resized, dim=0)))
    return torch.stack(outputs).float()


@pytest.mark.parametrize("resize_idx", [0, -1])
def test_s2_tower_matches_plain_reference(resize_idx: int) -> None:
    tower = tiny_tower()
    s2 = S2Tower(tower, [96, 32, 64], max_split_size=32, resize_output_to_scale_idx=resize_idx)
    assert s2.scales == (32, 64, 96)
    # Grids 4x4, 8x8, 12x12; idx 0 shrinks to 4x4 (block means), idx -1 grows to 12x12.
    side = 4 if resize_idx == 0 else 12
    assert (s2.image_size, s2.hidden_size, s2.output_tokens()) == (96, 48, side * side)
    assert s2.tiles_per_image == 1 + 4 + 9
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        got = s2(pixels)
        expected = s2_reference(tower, pixels, [32, 64, 96], 32, resize_idx)
    assert got.shape == (2, side * side, 48)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_s2_tower_channel_blocks_are_ascending_scales() -> None:
    # The largest scale's block (no interpolation, 2x2 tiles) must equal the plain tower's
    # tiles averaged 2x2; the smallest block must be the tower on the bicubic-shrunk image.
    tower = tiny_tower()
    s2 = S2Tower(tower, [32, 64], max_split_size=32)
    torch.manual_seed(2)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = s2(pixels)[0]
        small = tower(F.interpolate(pixels, size=32, mode="bicubic"))[0]
        top_left = tower(pixels[:, :, :32, :32])[0]
    torch.testing.assert_close(out[:, :16], small, atol=1e-5, rtol=1e-5)
    # Output token 0 covers tile (0, 0)'s tokens (0,0), (0,1), (1,0), (1,1) of its 4x4 grid.
    expected = top_left[[0, 1, 4, 5]].mean(dim=0)
    torch.testing.assert_close(out[0, 16:], expected, atol=1e-5, rtol=1e-5)


class _ShapeOnlyTower(nn.Module):
    """Stands in for SigLIP-so400m-384 where only the arithmetic is checked."""

    image_size = 384
    hidden_size = 1152
    dtype = torch.float16

    def output_tokens(self) -> int:
        return 729


def test_vila15_3b_s2_arithmetic() -> None:
    s2 = S2Tower.from_root_config(
        _ShapeOnlyTower(), {"s2_scales": "768,384", "s2_max_split_size": 384}
    )
    assert s2.scales == (384, 768)
    assert s2.resize_output_to_scale_idx == 0
    assert s2.tiles_per_image == 5  # 1 tile at 384 + 2x2 at 768
    assert s2.image_size == 768
    assert s2.hidden_size == 2304  # 1152 x 2 = mm_hidden_size
    assert s2.output_tokens() == 729  # the 384 scale's 27x27 grid
    assert s2.dtype == torch.float16
    with torch.device("meta"):
        projector = build_projector("mlp_downsample", s2.hidden_size, 2560)
    assert projector.layers[2].weight.shape == (2560, 9216)  # projector input 4 x 2304
    assert projector.output_tokens(s2.output_tokens()) == 196
    # §0.1: 30,170,112 projector parameters (the 60.3 MB file in bf16).
    assert sum(p.numel() for p in projector.parameters()) == 30_170_112


def test_s2_config_errors_name_the_field() -> None:
    tower = _ShapeOnlyTower()
    with pytest.raises(ValueError, match="s2_max_split_size"):
        S2Tower.from_root_config(tower, {"s2_scales": "384,768"})
    # 576 with split 384 -> 2x2 tiles of 288 px, which a 384 px tower cannot take.
    with pytest.raises(ValueError, match="s2_scales entry 576"):
        S2Tower(tower, [384, 576], 384)
    with pytest.raises(ValueError, match="s2_scales"):
        parse_s2_scales("384,big")
    with pytest.raises(ValueError, match="s2_resize_output_to_scale_idx"):
        S2Tower(tower, [384, 768], 384, resize_output_to_scale_idx=2)
    assert parse_s2_scales([1344, 448, 896]) == NVILA_SCALES


# ---------------------------------------------------------------- NVILA-8B dynamic-S2 tiling

# Candidates for the last scale (min (1344/448)^2 = 9, max 12 tiles), as cols/rows:
# 9: 1/9, 3/3, 9/1; 10: 1/10, 2/5, 5/2, 10/1; 11: 1/11, 11/1; 12: 1/12, 2/6, 3/4, 4/3, 6/2, 12/1.
DYNAMIC_S2_CASES = [
    # (width, height, (rows, cols)): worked by hand from the candidate list above.
    (1000, 1000, (3, 3)),  # aspect 1: 3/3 exact
    (448, 448, (3, 3)),  # same: a small square is still cut 3x3
    (1600, 800, (2, 5)),  # aspect 2: |2-5/2| = .5 beats |2-4/3| = .67 and |2-3| = 1
    (600, 1200, (5, 2)),  # aspect .5: |.5-2/5| = .1 beats |.5-2/6| = .17 and |.5-3/4| = .25
    (1024, 768, (3, 4)),  # aspect 4/3: exact
    (768, 1024, (4, 3)),  # aspect 3/4: exact
    (4000, 500, (1, 9)),  # aspect 8: |8-9| = 1 beats |8-6| = 2 and |8-10| = 2
    # aspect 10.5: 10/1 and 11/1 tie at .5; 11 tiles win only if w*h > .5*448^2*11 = 1,103,872
    (2100, 200, (1, 10)),  # w*h = 420,000: keeps 10/1
    (10500, 1000, (1, 11)),  # w*h = 10,500,000: takes 11/1
]


@pytest.mark.parametrize(("width", "height", "block"), DYNAMIC_S2_CASES)
def test_dynamic_s2_grid_and_token_count(width: int, height: int, block: tuple[int, int]) -> None:
    assert dynamic_s2_block_size(width, height, 448, NVILA_SCALES, 12) == block
    rows, cols = block
    assert rows * cols <= 12
    # 256 tokens per last-scale tile (32x32 -> 2x2 merge -> 16x16) plus the "\n" embedding.
    tokens = dynamic_s2_token_count(width, height, 448, NVILA_SCALES, 12, 256)
    assert tokens == 256 * rows * cols + 1


def test_dynamic_s2_token_counts_as_tabulated() -> None:
    assert dynamic_s2_token_count(1000, 1000, 448, NVILA_SCALES, 12, 256) == 2305  # 3x3
    assert dynamic_s2_token_count(1600, 800, 448, NVILA_SCALES, 12, 256) == 2561  # 2x5
    assert dynamic_s2_token_count(1024, 768, 448, NVILA_SCALES, 12, 256) == 3073  # 3x4


def test_find_closest_aspect_ratio_tie_rule() -> None:
    # Aspect 1 ties (1,1) and (2,2) exactly; (2,2) wins only above .5 * 448^2 * 4 = 401,408 px:
    # 634^2 = 401,956 is above, 633^2 = 400,689 is not.
    assert find_closest_aspect_ratio(1.0, [(1, 1), (2, 2)], 634, 634, 448) == (2, 2)
    assert find_closest_aspect_ratio(1.0, [(1, 1), (2, 2)], 633, 633, 448) == (1, 1)
    # Aspect 1.5 is .5 from both 1/1 and 2/1; 2/1 needs more than .5 * 448^2 * 2 = 200,704 px.
    assert find_closest_aspect_ratio(1.5, [(1, 1), (2, 1)], 600, 400, 448) == (2, 1)
    assert find_closest_aspect_ratio(1.5, [(1, 1), (2, 1)], 540, 360, 448) == (1, 1)


def _blocks_image(rows: int, cols: int, tile: int) -> Image.Image:
    """An RGB image of rows x cols flat tiles; tile (r, c) has red value 10*r + c + 1."""
    pixels = np.zeros((rows * tile, cols * tile, 3), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            pixels[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile, 0] = 10 * r + c + 1
    return Image.fromarray(pixels)


def test_dynamic_s2_tiles_content_and_order() -> None:
    # Tiny version: tile 8 px, scales 8/16/24. A 32x24 image has aspect 4/3 -> grid 4 cols x
    # 3 rows, exactly its own size, so the last-scale tiles are its flat blocks, row-major.
    image = _blocks_image(3, 4, 8)
    tiles, block = dynamic_s2_tiles(image, 8, (8, 16, 24), max_tiles=12)
    assert block == (3, 4)
    assert len(tiles) == 1 + 4 + 12
    assert all(t.size == (8, 8) for t in tiles)
    for index, tile in enumerate(tiles[5:]):
        r, c = divmod(index, 4)
        assert np.array_equal(np.asarray(tile)[..., 0], np.full((8, 8), 10 * r + c + 1))
    # The smaller scales squash the whole image to 8x8 and 16x16 (bicubic) and cut row-major.
    whole = np.asarray(image.resize((8, 8), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(tiles[0]), whole)
    doubled = np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC))
    for index, tile in enumerate(tiles[1:5]):
        r, c = divmod(index, 2)
        assert np.array_equal(np.asarray(tile), doubled[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8])


# ---------------------------------------------------------------- NVILA-Lite dynamic tiles

LITE_CASES = [
    # (width, height, (rows, cols), positions): 123 per tile, + thumbnail when more than 1 tile.
    (448, 448, (1, 1), 123),  # aspect 1: (1,1); (2,2) ties but 448^2 <= .5*448^2*4
    (700, 700, (2, 2), 123 * 5),  # 490,000 > 401,408 -> (2,2); not > 903,168 for (3,3)
    (1000, 1000, (3, 3), 123 * 10),  # 1,000,000 > 903,168 -> (3,3)
    (800, 400, (1, 2), 123 * 3),  # aspect 2: (2,1); (4,2) ties, 320,000 <= 802,816
    (1600, 800, (2, 4), 123 * 9),  # 1,280,000 > 802,816 -> (4,2), i.e. 2 rows x 4 cols
    (4000, 300, (1, 12), 123 * 13),  # aspect 13.3: 12/1 is the widest candidate
]


@pytest.mark.parametrize(("width", "height", "block", "positions"), LITE_CASES)
def test_lite_grid_and_token_count(
    width: int, height: int, block: tuple[int, int], positions: int
) -> None:
    assert dynamic_block_size(width, height, 448, 1, 12) == block
    assert dynamic_tile_token_count(width, height, 448, 1, 12) == positions


def test_lite_tiles_with_and_without_thumbnail() -> None:
    single = _blocks_image(1, 1, 8)
    assert [t.size for t in dynamic_tiles(single, 8)] == [(8, 8)]  # 1x1: no thumbnail
    wide = _blocks_image(1, 2, 8)  # aspect 2 -> (2 cols, 1 row); (4,2) tie loses: 128 <= 256
    tiles = dynamic_tiles(wide, 8)
    assert len(tiles) == 3
    assert np.array_equal(np.asarray(tiles[0])[..., 0], np.full((8, 8), 1))
    assert np.array_equal(np.asarray(tiles[1])[..., 0], np.full((8, 8), 2))
    thumbnail = np.asarray(wide.resize((8, 8), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(tiles[2]), thumbnail)
    assert len(dynamic_tiles(wide, 8, use_thumbnail=False)) == 2
    # Tiny-model token count: 3x3 merge of a 4x4 grid -> 4 tokens + 2 separators per tile.
    assert dynamic_tile_token_count(16, 8, 8, positions_per_tile=6) == 6 * 3


# ---------------------------------------------------------------- NVILA feature assembly


def dynamic_s2_reference(
    features: torch.Tensor, block: tuple[int, int], scales: list[int], resize_idx: int
) -> torch.Tensor:
    """§4.5 steps 3-5 with loops: boards per scale, area resize, channel concat, re-cut."""
    boards, start = [], 0
    grids = [(s // scales[0], s // scales[0]) for s in scales[:-1]] + [block]
    for rows, cols in grids:
        tiles = [features[start + k] for k in range(rows * cols)]
        boards.append(place_tile_tokens(tiles, rows, cols))
        start += rows * cols
    out_h, out_w = boards[resize_idx].shape[-2:]
    merged = torch.cat([area_resize_reference(b, out_h, out_w) for b in boards], dim=0)
    g = math.isqrt(features.shape[1])
    rows, cols = out_h // g, out_w // g
    out = []
    for i in range(rows):
        for j in range(cols):
            out.append(board_to_tokens(merged[:, i * g : (i + 1) * g, j * g : (j + 1) * g]))
    return torch.stack(out).float()


@pytest.mark.parametrize(("block", "resize_idx"), [((3, 4), -1), ((4, 3), -1), ((3, 4), 1)])
def test_merge_features_for_dynamic_s2_matches_loops(
    block: tuple[int, int], resize_idx: int
) -> None:
    # Scales 8/16/24 with 2x2-token tiles: boards 2x2, 4x4 and 6x8 (3 rows x 4 cols). Resizing
    # to the last scale upsamples 2->6 (copies) and 4->6, 4->8 (copies and 2-cell means).
    scales = [8, 16, 24]
    rows, cols = block
    torch.manual_seed(3)
    features = torch.randn(1 + 4 + rows * cols, 4, 3)
    got = merge_features_for_dynamic_s2(features, block, scales, resize_idx)
    expected = dynamic_s2_reference(features, block, scales, resize_idx)
    out_block = output_block_size(block, scales, resize_idx)
    assert out_block == (block if resize_idx == -1 else (2, 2))
    assert got.shape == (out_block[0] * out_block[1], 4, 9)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_merge_features_for_dynamic_s2_rejects_wrong_tile_count() -> None:
    with pytest.raises(ValueError, match="14 tiles"):
        merge_features_for_dynamic_s2(torch.zeros(14, 4, 2), (3, 4), [8, 16, 24])


def test_merge_tile_tokens_matches_loops() -> None:
    rows, cols, g, hidden = 2, 3, 2, 5
    projected = torch.randn(rows * cols, g * g, hidden)
    got = merge_tile_tokens(projected, (rows, cols))
    expected = torch.empty(rows * cols * g * g, hidden)
    for tile_row in range(rows):
        for tile_col in range(cols):
            for r in range(g):
                for c in range(g):
                    position = (tile_row * g + r) * (cols * g) + tile_col * g + c
                    expected[position] = projected[tile_row * cols + tile_col, r * g + c]
    assert torch.equal(got, expected)


def test_repeat_for_scales_copies_channels() -> None:
    features = torch.randn(2, 4, 3)
    out = repeat_for_scales(features, 3)
    assert out.shape == (2, 4, 9)
    for k in range(3):
        assert torch.equal(out[..., 3 * k : 3 * (k + 1)], features)
