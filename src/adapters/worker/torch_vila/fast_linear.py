"""Dense bf16 linears whose decode calls on CPU go through the AVX-512 kernel.

PyTorch's bf16 GEMV streams weights at about half the machine's read bandwidth; decode of a
16-bit model (and the 16-bit LM head of a 4-bit one) is exactly that GEMV. Calls with many rows
(prefill) keep `F.linear`, which is the faster GEMM there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vilaserve.adapters.worker import cpu_kernels

# Up to this many rows the kernel's one pass over W beats PyTorch's GEMM (it reaches ~1 row per
# weight load; a GEMM tiles rows and wins once there are enough of them).
DECODE_MAX_ROWS = 8


class CpuDecodeLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state dict) with a kernel for few bf16 rows."""

    def __init__(self, linear: nn.Linear, kernels: cpu_kernels.CpuKernels) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight  # shared, so tied embeddings stay tied
        self.bias = linear.bias
        self._kernels = kernels

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if (
            rows.shape[0] > DECODE_MAX_ROWS
            or x.dtype != torch.bfloat16
            or torch.is_grad_enabled()  # the kernel has no backward
        ):
            return F.linear(x, self.weight, self.bias)
        out = torch.empty(rows.shape[0], self.out_features, dtype=torch.bfloat16)
        self._kernels.dense_matmul(rows.contiguous(), self.weight, out)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)


def accelerate_cpu_linears(model: nn.Module) -> int:
    """Swaps every plain bf16 CPU `nn.Linear` with K % 32 == 0 for a `CpuDecodeLinear`.

    Returns how many were swapped (0 when the kernels cannot run on this machine).
    """
    kernels = cpu_kernels.load()
    if kernels is None:
        return 0
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
        and child.weight.device.type == "cpu"
        and child.weight.dtype == torch.bfloat16
        and child.weight.is_contiguous()
        and child.in_features % 32 == 0
    ]
    for parent, name, child in swaps:
        setattr(parent, name, CpuDecodeLinear(child, kernels))
    return len(swaps)
