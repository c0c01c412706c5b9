"""VILA's multimodal projector (`mm_projector/`): vision features -> LLM embedding space.

Module layouts mirror VILA's `MultimodalProjector` so checkpoint keys load unchanged: the
projector's parameters live under `layers`, which is a bare `nn.Linear` for `linear` (keys
`layers.weight/bias`) and an `nn.Sequential` otherwise (keys `layers.<i>.weight/bias`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")
PROJECTOR_TYPES = (
    "identity",
    "linear",
    "mlp{N}x_gelu",
    "mlp_downsample",
    "mlp_downsample_2x2_fix",
    "mlp_downsample_3x3_fix",
)
# Order of the merged tokens that `mlp_downsample` emits (see DownSampleBlock).
TOKEN_ORDERS = ("column", "row")
# Side of the square token window each projector type merges into one token (1: no merge).
_MERGE_WINDOW = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}


def _checked_token_order(token_order: str) -> str:
    if token_order not in TOKEN_ORDERS:
        raise ValueError(
            f"token_order must be one of {', '.join(TOKEN_ORDERS)}, got {token_order!r}"
        )
    return token_order


def merge_token_windows(x: torch.Tensor, window: int, row_major: bool) -> torch.Tensor:
    """[B, T, C] square grid -> [B, ceil(s/window)^2, window^2 * C] with s = sqrt(T).

    A grid whose side is not a multiple of `window` gets zero rows at the bottom and zero
    columns at the right. Within a merged token the channels are ordered by window row, then
    window column: (r, c), (r, c+1), ..., (r+1, c), ... The merged tokens come out row-major
    (`row_major`) or column-major over the reduced grid.
    """
    batch, tokens, channels = x.shape
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"token merge needs a square token grid, got {tokens} tokens")
    grid = x.reshape(batch, side, side, channels)
    pad = -side % window
    if pad:
        # Pad (last dim first): channels untouched, `pad` columns right, `pad` rows bottom.
        grid = nn.functional.pad(grid, (0, 0, 0, pad, 0, pad))
        side += pad
    reduced = side // window
    # [B, row_block, dr, col_block, dc, C]: (dr, dc) innermost gives the channel order; the
    # block axes, in either order, give the token order.
    windows = grid.reshape(batch, reduced, window, reduced, window, channels)
    block_axes = (1, 3) if row_major else (3, 1)
    windows = windows.permute(0, *block_axes, 2, 4, 5)
    return windows.reshape(batch, reduced * reduced, window * window * channels)


class DownSampleBlock(nn.Module):
    """Merges every 2x2 window of the square token grid into one token of 4x the width.

    [B, T, C] -> [B, ceil(s/2)^2, 4C] with s = sqrt(T). An odd grid gets one zero row at the
    bottom and one zero column at the right. Within a merged token the channels are ordered
    (r, c), (r, c+1), (r+1, c), (r+1, c+1).

    Token order: VILA-1.5's code (and so the VILA-1.5 projector weights) emits the merged tokens
    COLUMN-major over the half-size grid; the code NVILA was trained with added a final permute
    that makes them row-major. Each checkpoint family must get the order it was trained on, or
    the LLM sees a transposed image.
    """

    def __init__(self, token_order: str = "column") -> None:
        super().__init__()
        self.token_order = _checked_token_order(token_order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return merge_token_windows(x, 2, row_major=self.token_order == "row")


class DownSample3x3Block(nn.Module):
    """NVILA-Lite's 3x3 merge: [B, T, C] -> [B, ceil(s/3)^2, 9C], tokens row-major.

    The grid is zero-padded at the bottom/right to a multiple of 3 (32x32 -> 33x33 -> 121
    tokens); channels ordered (r, c), (r, c+1), (r, c+2), (r+1, c), ..., (r+2, c+2).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return merge_token_windows(x, 3, row_major=True)


class MultimodalProjector(nn.Module):
    """Holds the projector under `layers` (checkpoint layout) and knows its token arithmetic."""

    def __init__(self, projector_type: str, layers: nn.Module, mm_hidden: int, hidden: int) -> None:
        super().__init__()
        self.projector_type = projector_type
        self.mm_hidden = mm_hidden
        self.hidden = hidden
        self.layers = layers

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)

    def output_tokens(self, input_tokens: int) -> int:
        """Tokens per image (or tile) after projection, given the tower's tokens per image."""
        window = _MERGE_WINDOW.get(self.projector_type, 1)
        if window == 1:
            return input_tokens
        side = math.isqrt(input_tokens)
        if side * side != input_tokens:
            raise ValueError(
                f"{self.projector_type} needs a square token grid, got {input_tokens} tokens"
            )
        return math.ceil(side / window) ** 2


def build_projector(
    projector_type: str, mm_hidden: int, hidden: int, token_order: str = "column"
) -> MultimodalProjector:
    """Builds an (untrained) projector whose state_dict keys match VILA checkpoints.

    `token_order` ("column" for VILA-1.5 checkpoints, "row" for NVILA) only affects
    `mlp_downsample`: the `_fix` variants emit row-major tokens in every VILA version.
    """
    _checked_token_order(token_order)
    layers: nn.Module
    if projector_type == "identity":
        if mm_hidden != hidden:
            raise ValueError(
                f"identity projector needs mm_hidden == hidden ({mm_hidden} != {hidden})"
            )
        layers = nn.Identity()
    elif projector_type == "linear":
        layers = nn.Linear(mm_hidden, hidden)
    elif projector_type in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        order = token_order if projector_type == "mlp_downsample" else "row"
        layers = nn.Sequential(
            DownSampleBlock(order),
            nn.LayerNorm(4 * mm_hidden, eps=1e-5),
            nn.Linear(4 * mm_hidden, hidden),
            nn.GELU(approximate="none"),
            nn.Linear(hidden, hidden),
        )
    elif projector_type == "mlp_downsample_3x3_fix":
        layers = nn.Sequential(
            DownSample3x3Block(),
            nn.LayerNorm(9 * mm_hidden, eps=1e-5),
            nn.Linear(9 * mm_hidden, 3 * mm_hidden),
            nn.GELU(approximate="none"),
            nn.LayerNorm(3 * mm_hidden, eps=1e-5),
            nn.Linear(3 * mm_hidden, hidden),
            nn.GELU(approximate="none"),
            nn.Linear(hidden, hidden),
        )
    elif match := _MLP_GELU.match(projector_type):
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(f"projector type {projector_type!r}: depth must be at least 1")
        modules: list[nn.Module] = [nn.Linear(mm_hidden, hidden)]
        for _ in range(depth - 1):
            modules += [nn.GELU(approximate="none"), nn.Linear(hidden, hidden)]
        layers = nn.Sequential(*modules)
    else:
        raise ValueError(
            f"unknown mm_projector_type {projector_type!r} "
            f"(supported: {', '.join(PROJECTOR_TYPES)})"
        )
    return MultimodalProjector(projector_type, layers, mm_hidden, hidden)


def read_projector_type(directory: Path) -> str:
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read projector config {config_path}: {exc}") from exc
    projector_type = config.get("mm_projector_type") if isinstance(config, dict) else None
    if not isinstance(projector_type, str):
        raise ValueError(f"{config_path} has no string field 'mm_projector_type'")
    return projector_type


def load_projector(
    directory: Path,
    mm_hidden: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device | str,
    token_order: str = "column",
) -> MultimodalProjector:
    """Loads `mm_projector/` (config.json + model.safetensors), checking every key and shape.

    `token_order`: see `build_projector` (the checkpoint itself does not record it).
    """
    directory = Path(directory)
    projector_type = read_projector_type(directory)
    weights_path = directory / "model.safetensors"
    # Build on the meta device: no time is spent on random init of weights we overwrite anyway.
    with torch.device("meta"):
        projector = build_projector(projector_type, mm_hidden, hidden, token_order)
    try:
        state = load_file(str(weights_path))
    except (OSError, RuntimeError) as exc:  # safetensors raises both for missing/corrupt files
        raise ValueError(f"cannot read projector weights {weights_path}: {exc}") from exc

    expected = projector.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected.keys() & state.keys()
        if state[key].shape != expected[key].shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{weights_path} does not match a {projector_type!r} projector "
            f"(mm_hidden={mm_hidden}, hidden={hidden}): missing keys {missing}, "
            f"unexpected keys {unexpected}, shape mismatches {mismatched}"
        )
    state = {key: tensor.to(device=device, dtype=dtype) for key, tensor in state.items()}
    projector.load_state_dict(state, strict=True, assign=True)
    return projector.eval()
