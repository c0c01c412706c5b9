"""An AWQ search result (`AwqReport`) as a safetensors file, so a build can apply a search done
once instead of searching again (the demo ships the one for its LLM).

The scales are stored in fp32 (the rescale they drive must equal the searched one bit for bit);
the clip choices are shrink steps below 16, two to a byte. What the search was given and
decided beyond the tensors (module names, alphas, losses, GQA sharing) is JSON in the file's
metadata; the losses per alpha are diagnostics and are not kept.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vilaserve.adapters.offline.awq_quantizer import (
    AwqReport,
    ClipChoice,
    HeadSharing,
    ScaleSearch,
)

FORMAT = "vilaserve-awq-search/1"
_NIBBLE = 16  # shrink steps are stored in 4 bits


def save_awq_search(path: Path, result: AwqReport, extra: dict[str, str] | None = None) -> None:
    """Writes `result` to `path`; `extra` goes into the file's metadata as is."""
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for search in result.scale_searches:
        tensors[f"scales.{search.prev_op}"] = search.scales.to(torch.float32).contiguous()
        sharing = search.sharing
        groups.append(
            {
                "prev_op": search.prev_op,
                "linears": list(search.linears),
                "alpha": search.alpha,
                "loss": search.loss,
                "sharing": None if sharing is None else [sharing.repeats, sharing.head_dim],
            }
        )
    clip_shapes = {}
    for name, choice in result.clips.items():
        clip_shapes[name] = list(choice.top_steps.shape)
        tensors[f"clip_top.{name}"] = _pack_steps(choice.top_steps)
        if choice.bottom_steps is not None:
            tensors[f"clip_bottom.{name}"] = _pack_steps(choice.bottom_steps)
    metadata = {
        **(extra or {}),
        "format": FORMAT,
        "scale_groups": json.dumps(groups),
        "clip_shapes": json.dumps(clip_shapes),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def load_awq_search(path: Path) -> tuple[AwqReport, dict[str, str]]:
    """The result saved at `path`, and the file's metadata."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: not an AWQ search result ({FORMAT})")
    tensors = load_file(str(path))
    result = AwqReport()
    for group in json.loads(metadata["scale_groups"]):
        sharing = group["sharing"]
        result.scale_searches.append(
            ScaleSearch(
                prev_op=group["prev_op"],
                linears=tuple(group["linears"]),
                alpha=float(group["alpha"]),
                loss=float(group["loss"]),
                losses=[],
                scales=tensors[f"scales.{group['prev_op']}"],
                sharing=None if sharing is None else HeadSharing(*sharing),
            )
        )
    for name, shape in json.loads(metadata["clip_shapes"]).items():
        bottom = tensors.get(f"clip_bottom.{name}")
        result.clips[name] = ClipChoice(
            _unpack_steps(tensors[f"clip_top.{name}"], shape),
            None if bottom is None else _unpack_steps(bottom, shape),
        )
    return result, metadata


def _pack_steps(steps: torch.Tensor) -> torch.Tensor:
    """uint8 steps (< 16) of any shape -> a flat uint8 tensor, two steps a byte (low first)."""
    flat = steps.reshape(-1).to(torch.uint8)
    if flat.numel() and int(flat.max()) >= _NIBBLE:
        raise ValueError("clip shrink steps must be below 16 to be stored in 4 bits")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).contiguous()


def _unpack_steps(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    pairs = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return pairs[: math.prod(shape)].reshape(shape).contiguous()
