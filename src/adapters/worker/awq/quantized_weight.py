"""The canonical form of one 4-bit AWQ linear layer, independent of any packing.

Every on-disk format (llm-awq v2 / v1, AutoAWQ GEMM / GEMV) is unpacked into this, and every
kernel packs from it: `w[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g]` with `g = k // group`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedWeight:
    q: torch.Tensor  # uint8 [N, K], values 0..15
    scales: torch.Tensor  # float16 / bfloat16 / float32 [N, K // group_size]
    zeros: torch.Tensor  # uint8 [N, K // group_size], values 0..15
    group_size: int
    bias: torch.Tensor | None = None  # [N]

    def __post_init__(self) -> None:
        n, k = self.q.shape
        groups = k // self.group_size
        if k % self.group_size:
            raise ValueError(f"in_features {k} is not a multiple of group size {self.group_size}")
        for name, t in (("scales", self.scales), ("zeros", self.zeros)):
            if tuple(t.shape) != (n, groups):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(n, groups)}")

    @property
    def out_features(self) -> int:
        return int(self.q.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.q.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference [N, K] weight (used by tests and by the plain fallback path)."""
        group = self.group_size
        scales = self.scales.to(torch.float32).repeat_interleave(group, dim=1)
        zeros = self.zeros.to(torch.float32).repeat_interleave(group, dim=1)
        return ((self.q.to(torch.float32) - zeros) * scales).to(dtype)
