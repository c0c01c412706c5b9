"""Weights in the kernels' layouts: 4-bit AWQ weights for the W4A16 kernels (int4_matmul.c,
fp32_kernels.c, prefill_gemm.c) and int8 weights for the W8A8 GEMM (w8a8_gemm.c).

The layouts are described in the C files' header comments; the shape rules here are theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vilaserve.adapters.worker.awq.quantized_weight import QuantizedWeight

TILE_ROWS = 16
BLOCK = 64
MAX_GROUP = 2048  # keeps the kernel's int32 partial sums exact (int4_matmul.c)


@dataclass(frozen=True)
class PackedInt4:
    """One linear layer in the W4A16 kernels' layout (see int4_matmul.c's header comment)."""

    weight: Tensor  # uint8 [N * K / 2]
    scales: Tensor  # float16 [N / 16, K / group, 16]
    zeros: Tensor  # uint8 [N / 16, K / group, 16]


@dataclass(frozen=True)
class PackedInt8:
    """One linear layer for w8a8_gemm.c: int8 weights in tiles of 8 channels x 4 columns."""

    weight: Tensor  # int8 [N / 8, K / 4, 8, 4]
    scales: Tensor  # float32 [N]: w = q * scale
    sums: Tensor  # int32 [N]: each channel's sum of q (the kernel's unsigned offset comes out)


def fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the W4A16 kernels take this shape."""
    return (
        out_features % TILE_ROWS == 0
        and in_features % BLOCK == 0
        and group_size % BLOCK == 0
        and group_size <= MAX_GROUP
        and in_features % group_size == 0
    )


def pack_for_kernel(w: QuantizedWeight) -> PackedInt4:
    n, k = w.out_features, w.in_features
    if not fits(n, k, w.group_size):
        raise ValueError(
            f"the native int4 kernels need N%16, K%64, group%64 == 0 and group <= {MAX_GROUP}; "
            f"got {n}x{k} g{w.group_size}"
        )
    # Columns in chunks of 8: the low nibbles hold the first 4, the high nibbles the last 4.
    q = w.q.to(torch.uint8).view(n // TILE_ROWS, TILE_ROWS, k // 8, 2, 4)
    nibbles = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # [N/16, 16, K/8, 4]
    weight = nibbles.permute(0, 2, 1, 3).contiguous().view(-1)

    def tiles(t: Tensor, dtype: torch.dtype) -> Tensor:
        groups = t.shape[1]
        return t.to(dtype).view(n // TILE_ROWS, TILE_ROWS, groups).transpose(1, 2).contiguous()

    return PackedInt4(weight, tiles(w.scales, torch.float16), tiles(w.zeros, torch.uint8))


def w8a8_fits(out_features: int, in_features: int) -> bool:
    """Whether the W8A8 GEMM takes this shape."""
    return out_features % 16 == 0 and in_features % 8 == 0


def pack_int8(q: Tensor, scales: Tensor) -> PackedInt8:
    """int8 q [N, K] with per-channel fp32 scales, in w8a8_gemm.c's layout."""
    n, k = q.shape
    if not w8a8_fits(n, k):
        raise ValueError(f"the W8A8 kernel needs N % 16 == 0 and K % 8 == 0; got {n}x{k}")
    tiles = q.view(n // 8, 8, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    return PackedInt8(tiles, scales.float().contiguous(), q.sum(1, dtype=torch.int32))
