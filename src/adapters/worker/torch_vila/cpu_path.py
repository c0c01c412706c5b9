"""Puts a loaded LLM on this machine's CPU path: the one place that decides which kernels run.

`llama.py` is plain PyTorch. At load, `put_on_cpu_path` takes the path `cpu_kernels.cpu_path()`
names (the CPU's best, or the one `VILASERVE_CPU_PATH` forces) and swaps modules for ones that
call its native kernels, in gpt-fast's `replace_linear_int4` style:

* every native path: dense linears become `Avx512DecodeLinear` (AVX-512) or `PortableDecodeLinear`
  (AVX2, NEON) (fast_linear.py), and the model's body a `NativeDecodeBody`, which runs a decode
  step of all layers in one native call (native_decode.py) where the step qualifies;
* ``avx512_bf16`` also: RMSNorm and attention become `KernelRMSNorm` / `KernelAttention`, the
  per-op decode on the bf16 kernels, for the steps the one-call decoder declines.

Two choices belong to earlier steps of the load and follow the same path: the dtype the model
computes in (device.py `resolve_dtype`) and the packing of W4A16 layers (awq/qlinear.py
`resolve_backend`). Nothing is swapped on the torch path or off the CPU. Swapped modules share
the tensors under the same names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.torch_vila.fast_linear import (
    FP32_KERNEL_MAX_ROWS,
    accelerate_cpu_linears,
)
from vilaserve.adapters.worker.torch_vila.kv_cache import KVCache
from vilaserve.adapters.worker.torch_vila.llama import (
    Attention,
    LayerStep,
    Llama,
    LlamaBody,
    RMSNorm,
)
from vilaserve.adapters.worker.torch_vila.llama_config import LlamaArgs
from vilaserve.adapters.worker.torch_vila.native_decode import NativeDecoder

# Decode-sized calls (a few rows) go to the AVX-512 norm kernel; PyTorch's ops win on prefill.
KERNEL_NORM_MAX_ROWS = 8
# The attention kernel's head sizes (decoder.c).
_KERNEL_HEAD_DIMS = range(32, 257, 32)


@dataclass(frozen=True)
class CpuPathReport:
    path: str  # the kernels' path, or the device type off the CPU
    kernel_linears: int  # linears swapped onto a native kernel
    native_decode: bool  # decode steps run all layers in one native call


def put_on_cpu_path(model: Llama, one_call_decode: bool = True) -> CpuPathReport:
    """Swaps `model`'s modules for this machine's CPU path (call it once, after loading and
    fusing the weights). Returns what it did. Without `one_call_decode` the same kernels run
    op by op from Python (what benchmarks and tests compare the one-call decoder with)."""
    if model.device.type != "cpu":
        return CpuPathReport(model.device.type, 0, False)
    path = cpu_kernels.cpu_path()
    avx512 = cpu_kernels.load()
    kernels: cpu_kernels.NativeKernels | None = avx512 or cpu_kernels.load_fp32()
    if kernels is None:  # the torch path
        return CpuPathReport(path, 0, False)
    linears = accelerate_cpu_linears(model, kernels)
    if avx512 is not None:
        swap_kernel_norms_and_attention(model, avx512)
    if not one_call_decode:
        return CpuPathReport(path, linears, False)
    dtype = torch.bfloat16 if avx512 is not None else torch.float32
    body = NativeDecodeBody(model.model, model.args, kernels, dtype)
    model.model = body
    return CpuPathReport(path, linears, body.decoder is not None)


def swap_kernel_norms_and_attention(model: Llama, kernels: cpu_kernels.Avx512Kernels) -> None:
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is RMSNorm and child.weight.shape[0] % 16 == 0:
                setattr(parent, name, KernelRMSNorm(child, kernels))
            elif type(child) is Attention and child.head_dim in _KERNEL_HEAD_DIMS:
                setattr(parent, name, KernelAttention(child, kernels))


class KernelRMSNorm(RMSNorm):
    """RMSNorm of a few bf16 rows on the AVX-512 kernel (bit-exact to the fp32 sum order);
    prefill and autograd keep PyTorch's ops."""

    def __init__(self, norm: RMSNorm, kernels: cpu_kernels.Avx512Kernels) -> None:
        nn.Module.__init__(self)
        self.weight = norm.weight
        self.eps = norm.eps
        self.kernels = kernels

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.dtype == self.weight.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and x.numel() <= KERNEL_NORM_MAX_ROWS * x.shape[-1]
            and not torch.is_grad_enabled()  # the kernels have no backward
        ):
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class KernelAttention(Attention):
    """Attention whose one-position steps run on the AVX-512 kernels: rotary straight into the
    query buffer and the cache row, then attention over the row's prefix (same rounding as
    the torch path; it replaces about a dozen small ops per layer)."""

    def __init__(self, attention: Attention, kernels: cpu_kernels.Avx512Kernels) -> None:
        nn.Module.__init__(self)
        # The same layer: its settings and projections, shared.
        vars(self).update(vars(attention))
        self.kernels = kernels

    def forward(self, x: Tensor, step: LayerStep, cache: KVCache) -> Tensor:
        batch, length, _ = x.shape
        if (
            length == 1
            and step.rows is None
            and step.mask is None
            and x.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
        ):
            q, k, v = self.project(x)
            return self.o_proj(self._decode(q, k, v, step, cache).view(batch, 1, -1))
        return super().forward(x, step, cache)

    def _decode(self, q: Tensor, k: Tensor, v: Tensor, step: LayerStep, cache: KVCache) -> Tensor:
        kernels, batch, pos, dim = self.kernels, q.shape[0], step.start_pos, self.head_dim
        cos, sin = step.cos[0], step.sin[0]
        rotated_q = torch.empty(batch, self.n_heads, 1, dim, dtype=q.dtype)
        kernels.rope(q.view(batch, self.n_heads, dim), cos, sin, rotated_q.view(batch, -1, dim))
        layer_keys, layer_values = cache.keys[self.layer_idx], cache.values[self.layer_idx]
        kernels.rope(k.view(batch, self.n_kv_heads, dim), cos, sin, layer_keys[:, :, pos])
        layer_values[:, :, pos] = v.view(batch, self.n_kv_heads, dim)
        end = pos + 1
        return kernels.decode_attention(
            rotated_q, layer_keys[:, :, :end], layer_values[:, :, :end], self.scale
        )

    def _attend_one(self, q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and not torch.is_grad_enabled():
            return self.kernels.decode_attention(q.contiguous(), keys, values, self.scale)
        return super()._attend_one(q, keys, values)


class NativeDecodeBody(LlamaBody):
    """The model's body (same embedding, layers and norm) whose decode steps run all layers in
    one native call; prefill, autograd, other dtypes and larger batches run layer by layer.

    The native plan points at the weights: it is made on first use and dropped when they may
    move (`.to()`) or when the model is copied (ctypes structures do not copy).
    """

    def __init__(
        self,
        body: LlamaBody,
        args: LlamaArgs,
        kernels: cpu_kernels.NativeKernels,
        dtype: torch.dtype,
    ) -> None:
        nn.Module.__init__(self)
        self.embed_tokens, self.layers, self.norm = body.embed_tokens, body.layers, body.norm
        self.args = args
        self.kernels = kernels
        self.dtype = dtype  # of the hidden state the native decoder reads and writes
        # Benchmarks switch it off to time the same kernels dispatched op by op.
        self.one_call = True
        self._planned = False
        self._decoder: NativeDecoder | None = None

    @property
    def decoder(self) -> NativeDecoder | None:
        """The one-call decoder of these layers, or None where some layer is not one it runs."""
        if not self._planned:
            self._decoder = NativeDecoder.for_layers(
                self.args, self.layers, self.kernels, self.dtype
            )
            self._planned = True
        return self._decoder

    def replan(self) -> None:
        """Forgets the plan: call it after replacing modules of the layers (quantizing them,
        fusing projections), so the next step reads the new ones."""
        self._planned, self._decoder = False, None

    def run_layers(self, hidden: Tensor, step: LayerStep, cache: KVCache) -> Tensor:
        batch, length, _ = hidden.shape
        if (
            length != 1
            or step.segments  # packed prefill: per-chunk positions the decoder does not take
            or not self.one_call
            or batch > FP32_KERNEL_MAX_ROWS  # a decode batch (C: VS_MAX_DECODE_ROWS)
            or hidden.dtype != self.dtype
            or not hidden.is_contiguous()
            or torch.is_grad_enabled()  # the kernels have no backward
        ):
            return super().run_layers(hidden, step, cache)
        decoder = self.decoder
        if decoder is None:
            return super().run_layers(hidden, step, cache)
        if step.rows is None:  # every row at the same position (`Llama.forward`)
            positions = torch.full((batch,), step.start_pos, dtype=torch.int64)
            rows = torch.arange(batch, dtype=torch.int64)
            cos, sin = step.cos.expand(batch, -1), step.sin.expand(batch, -1)
        else:  # `Llama.decode_rows`: on the CPU, the step's tensors are the host's
            assert step.positions is not None
            positions, rows = step.positions, step.rows
            cos, sin = step.cos.view(batch, -1), step.sin.view(batch, -1)
        return decoder.run(hidden, cache, positions, rows, cos, sin)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> NativeDecodeBody:
        self.replan()  # `.to()` / `.half()` may move or recast the weights
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_planned"], state["_decoder"] = False, None
        return state
