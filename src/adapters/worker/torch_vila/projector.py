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
PROJECTOR_TYPES = ("identity", "linear", "mlp{N}x_gelu", "mlp_downsample")


class DownSampleBlock(nn.Module):
    """Merges every 2x2 window of the square token grid into one token of 4x the width.

    [B, T, C] -> [B, ceil(s/2)^2, 4C] with s = sqrt(T). An odd grid gets one zero row at the
    bottom and one zero column at the right. Within a merged token the channels are ordered
    (r, c), (r, c+1), (r+1, c), (r+1, c+1). The merged tokens come out COLUMN-major over the
    half-size grid: this is what VILA's reshape/permute sequence produces and what the released
    projector weights were trained on, so a "natural" row-major order would degrade quality.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"DownSampleBlock needs a square token grid, got {tokens} tokens")
        grid = x.reshape(batch, side, side, channels)
        if side % 2 == 1:
            # Pad (last dim first): channels untouched, one column right, one row bottom.
            grid = nn.functional.pad(grid, (0, 0, 0, 1, 0, 1))
            side += 1
        half = side // 2
        # [B, row_pair, dr, col_pair, dc, C] -> [B, col_pair, row_pair, dr, dc, C]: col_pair
        # outermost gives the column-major token order, (dr, dc) innermost the channel order.
        windows = grid.reshape(batch, half, 2, half, 2, channels).permute(0, 3, 1, 2, 4, 5)
        return windows.reshape(batch, half * half, 4 * channels)


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
        """Tokens per image after projection, given the vision tower's tokens per image."""
        if self.projector_type != "mlp_downsample":
            return input_tokens
        side = math.isqrt(input_tokens)
        if side * side != input_tokens:
            raise ValueError(f"mlp_downsample needs a square token grid, got {input_tokens} tokens")
        return ((side + 1) // 2) ** 2


def build_projector(projector_type: str, mm_hidden: int, hidden: int) -> MultimodalProjector:
    """Builds an (untrained) projector whose state_dict keys match VILA checkpoints."""
    layers: nn.Module
    if projector_type == "identity":
        if mm_hidden != hidden:
            raise ValueError(
                f"identity projector needs mm_hidden == hidden ({mm_hidden} != {hidden})"
            )
        layers = nn.Identity()
    elif projector_type == "linear":
        layers = nn.Linear(mm_hidden, hidden)
    elif projector_type == "mlp_downsample":
        layers = nn.Sequential(
            DownSampleBlock(),
            nn.LayerNorm(4 * mm_hidden, eps=1e-5),
            nn.Linear(4 * mm_hidden, hidden),
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
) -> MultimodalProjector:
    """Loads `mm_projector/` (config.json + model.safetensors), checking every key and shape."""
    directory = Path(directory)
    projector_type = read_projector_type(directory)
    weights_path = directory / "model.safetensors"
    # Build on the meta device: no time is spent on random init of weights we overwrite anyway.
    with torch.device("meta"):
        projector = build_projector(projector_type, mm_hidden, hidden)
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
