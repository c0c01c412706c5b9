"""Dense linears whose decode calls on CPU go through a native kernel.

PyTorch's bf16 GEMV streams weights at about half the machine's read bandwidth; decode of a
16-bit model (and the 16-bit LM head of a 4-bit one) is exactly that GEMV. Calls with many rows
(prefill) keep `F.linear`, which is the faster GEMM there.

On the AVX-512 path the model is bf16 throughout (`Avx512DecodeLinear`). On the fp32 paths
(AVX2, NEON) it
computes in fp32, but a weight that is exactly 16-bit (every weight of a bf16 or fp16
checkpoint) is kept in 16 bits (`PortableDecodeLinear`): decode streams half the bytes, and the
kernel widens them in registers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.torch_vila.device import apply_keeping_dtypes

# Up to this many rows the kernel's one pass over W beats PyTorch's GEMM (it reaches ~1 row per
# weight load; a GEMM tiles rows and wins once there are enough of them).
DECODE_MAX_ROWS = 8
# The largest decode batch kept in the kernels: the engine decodes all running sequences in one
# step. The fp32 paths would otherwise widen a 16-bit or int8 weight to fp32 for a GEMM, a full
# copy of the weight per call (100 ms for SmolLM2's int8 head at 16 rows, against 11 ms in the
# kernel); the one-call decoder streams every weight once for all rows.
FP32_KERNEL_MAX_ROWS = 64


class Avx512DecodeLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state dict) with a kernel for few bf16 rows."""

    def __init__(self, linear: nn.Linear, kernels: cpu_kernels.Avx512Kernels) -> None:
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


class PortableDecodeLinear(nn.Module):
    """A linear layer holding its weight in 16 bits (bf16 or fp16) for any activation dtype:
    few rows (decode) run on the fp32 kernel (AVX2 / NEON), more rows widen the weight for one
    GEMM."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None, kernels: cpu_kernels.Fp32Kernels
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self._kernels = kernels

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if (
            rows.shape[0] > FP32_KERNEL_MAX_ROWS
            or x.dtype not in (torch.float32, torch.bfloat16)
            or torch.is_grad_enabled()
        ):
            return F.linear(x, self.weight.to(x.dtype), self.bias)
        out = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype)
        self._kernels.dense_matmul(rows.contiguous(), self.weight, out)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.dtype}"
        )

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> PortableDecodeLinear:
        # `model.float()` must not widen the 16-bit weight the kernel streams: it follows
        # device moves only (the bias follows the model's dtype).
        apply_keeping_dtypes(self, fn, recurse, names=("weight",))
        return self


def exact_16_bit(weight: Tensor) -> Tensor | None:
    """`weight` in bf16 or fp16 if one of them holds it exactly, else None."""
    if weight.dtype in (torch.bfloat16, torch.float16):
        return weight
    for dtype in (torch.bfloat16, torch.float16):
        narrow = weight.to(dtype)
        if torch.equal(narrow.to(weight.dtype), weight):
            return narrow
    return None


def accelerate_cpu_linears(model: nn.Module, kernels: cpu_kernels.NativeKernels) -> int:
    """Puts the plain CPU `nn.Linear`s on `kernels` (cpu_path.py chooses them).

    AVX-512: bf16 linears with K % 32 == 0 become `Avx512DecodeLinear`. fp32 paths (AVX2, NEON):
    linears whose weight is exactly 16-bit, with K % 8 == 0, become `PortableDecodeLinear`.
    Returns how many were swapped.
    """
    if isinstance(kernels, cpu_kernels.Fp32Kernels):
        return _swap_for_fp32(model, kernels)
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
        setattr(parent, name, Avx512DecodeLinear(child, kernels))
    return len(swaps)


def _swap_for_fp32(model: nn.Module, kernels: cpu_kernels.Fp32Kernels) -> int:
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if (
                type(child) is nn.Linear
                and child.weight.device.type == "cpu"
                and child.in_features % 8 == 0
            ):
                narrow = exact_16_bit(child.weight.detach())
                if narrow is not None:
                    swaps.append((parent, name, child, narrow))
    for parent, name, child, narrow in swaps:
        bias = None if child.bias is None else child.bias.detach()
        setattr(parent, name, PortableDecodeLinear(narrow, bias, kernels))
    return len(swaps)
