"""The ctypes side of decoder.c: a model's layers and a KV cache described once, as C structs.

`DecoderPlan` is built once per model (pointers to its weights, which it keeps alive) and
`CachePointers` once per KV cache; a decode step then costs one foreign call for all layers.
The field order of every Structure here must match decoder.c.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

_NONE, _INT4, _BF16, _FP16 = 0, 1, 2, 3


class _Linear(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int64),
        ("weight", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("group", ctypes.c_int64),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("qkv", _Linear * 3),
        ("gate_up", _Linear * 2),
        ("o", _Linear),
        ("down", _Linear),
        ("qkv_bias", ctypes.c_void_p * 3),
    ]


class _Dims(ctypes.Structure):
    _fields_ = [
        ("layers", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("intermediate", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


class PackedLinear(Protocol):
    """What matmul.c's 4-bit layout provides (packing.PackedInt4)."""

    weight: Tensor
    scales: Tensor
    zeros: Tensor


@dataclass(frozen=True)
class LinearSpec:
    """One bias-free linear layer the C code can run: 4-bit packed or dense 16-bit [N, K]
    (bf16; fp16 too on the AVX2 path)."""

    out_features: int
    in_features: int
    packed: PackedLinear | None = None
    group_size: int = 0
    dense: Tensor | None = None

    def to_struct(self) -> _Linear:
        if self.packed is not None:
            p = self.packed
            return _Linear(
                _INT4, p.weight.data_ptr(), p.scales.data_ptr(), p.zeros.data_ptr(),
                self.out_features, self.in_features, self.group_size,
            )  # fmt: skip
        assert self.dense is not None
        kind = _FP16 if self.dense.dtype == torch.float16 else _BF16
        return _Linear(
            kind, self.dense.data_ptr(), None, None, self.out_features, self.in_features, 0
        )


@dataclass(frozen=True)
class LayerSpec:
    input_norm: Tensor
    post_norm: Tensor
    qkv: Sequence[LinearSpec]  # one fused layer, or q, k, v
    gate_up: Sequence[LinearSpec]  # one fused layer, or gate, up
    o: LinearSpec
    down: LinearSpec
    # Qwen2: one bias [out_features] per q/k/v part (None: that part has none), in the
    # activations' dtype; empty: no biases.
    qkv_bias: Sequence[Tensor | None] = ()


@dataclass
class DecoderPlan:
    """Every decoder layer of one model as C structs. `layers` keeps the tensors the structs
    point at alive for as long as the plan lives."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    scale: float
    layers: Sequence[LayerSpec]
    _dims: _Dims = field(init=False, repr=False)
    _structs: ctypes.Array[_Layer] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._dims = _Dims(
            len(self.layers), self.hidden, self.heads, self.kv_heads, self.head_dim,
            self.intermediate, self.eps, self.scale,
        )  # fmt: skip
        self._structs = (_Layer * len(self.layers))()
        for native, layer in zip(self._structs, self.layers, strict=True):
            if not 1 <= len(layer.qkv) <= 3 or not 1 <= len(layer.gate_up) <= 2:
                raise ValueError("q/k/v come as 1-3 linears and gate/up as 1-2")
            if layer.qkv_bias and len(layer.qkv_bias) != len(layer.qkv):
                raise ValueError("give one q/k/v bias (or None) per q/k/v linear")
            native.input_norm = layer.input_norm.data_ptr()
            native.post_norm = layer.post_norm.data_ptr()
            for i, part in enumerate(layer.qkv):
                native.qkv[i] = part.to_struct()
            for i, (part, bias) in enumerate(zip(layer.qkv, layer.qkv_bias, strict=False)):
                if bias is not None:
                    if not bias.is_contiguous() or bias.numel() != part.out_features:
                        raise ValueError(f"q/k/v bias {i} must be contiguous [{part.out_features}]")
                    native.qkv_bias[i] = bias.data_ptr()
            for i, part in enumerate(layer.gate_up):
                native.gate_up[i] = part.to_struct()
            native.o = layer.o.to_struct()
            native.down = layer.down.to_struct()

    @property
    def dims_address(self) -> int:
        return ctypes.addressof(self._dims)

    @property
    def layers_address(self) -> int:
        return ctypes.addressof(self._structs)

    def scratch(self, batch: int, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """The work buffer the decoder needs for `batch` rows, in the activations' dtype (see
        decoder.c's header comment)."""
        q_width = self.heads * self.head_dim
        qkv_width = q_width + 2 * self.kv_heads * self.head_dim
        per_row = 2 * self.hidden + qkv_width + 2 * q_width + 3 * self.intermediate
        return torch.empty(batch * per_row, dtype=dtype)


@dataclass
class CachePointers:
    """The per-layer key and value buffers of one KV cache, [B, kv_heads, max_len, head_dim]."""

    keys_address: int
    values_address: int
    batch_stride: int
    head_stride: int
    _arrays: tuple[ctypes.Array[ctypes.c_void_p], ...] = ()

    @classmethod
    def of(cls, keys: Sequence[Tensor], values: Sequence[Tensor]) -> CachePointers:
        first = keys[0]
        for t in (*keys, *values):
            if (
                t.dtype != first.dtype
                or first.dtype not in (torch.bfloat16, torch.float32)
                or not t.is_contiguous()
                or t.shape != first.shape
            ):
                raise ValueError("cache buffers must be contiguous, of one shape, bf16 or fp32")
        key_array = (ctypes.c_void_p * len(keys))(*(t.data_ptr() for t in keys))
        value_array = (ctypes.c_void_p * len(values))(*(t.data_ptr() for t in values))
        return cls(
            ctypes.addressof(key_array),
            ctypes.addressof(value_array),
            first.stride(0),
            first.stride(1),
            (key_array, value_array),
        )
