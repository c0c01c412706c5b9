"""What both kernel libraries export with one signature under their own prefix (`vs_` for the
AVX-512 set, `vsf_` for the fp32 set): the int4 dequantize and the one-call decoder."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from vilaserve.adapters.worker.cpu_kernels.decoder import CachePointers, DecoderPlan
from vilaserve.adapters.worker.cpu_kernels.packing import PackedInt4


class KernelLibrary:
    """A loaded kernel library's shared entry points; each set's class adds its own."""

    def __init__(self, library: ctypes.CDLL, prefix: str) -> None:
        i64, ptr, flag = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self._prefix = prefix
        self._dequant = getattr(library, f"{prefix}int4_dequantize")
        self._dequant.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, flag, flag]
        self._dequant.restype = ctypes.c_int
        self._decode_layers = getattr(library, f"{prefix}decode_layers")
        self._decode_layers.argtypes = [ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64,
                                        i64, ptr, flag]  # fmt: skip
        self._decode_layers.restype = ctypes.c_int

    # One loaded library per process: copies of a model refer to it, not to a copy of ctypes
    # handles (which cannot be copied).
    def __deepcopy__(self, memo: dict[int, object]) -> KernelLibrary:
        return self

    def dequantize(self, w: PackedInt4, n: int, k: int, group: int, out: Tensor) -> None:
        """out[N, K] (bf16 or fp32) = (q - z) * s."""
        status = self._dequant(
            w.weight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(), n, k, group,
            out.data_ptr(), out.dtype == torch.float32, torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise RuntimeError(f"{self._prefix}int4_dequantize failed with status {status}")

    def decode_layers(
        self,
        plan: DecoderPlan,
        hidden: Tensor,
        positions: Tensor,
        rows: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: CachePointers,
        scratch: Tensor,
    ) -> None:
        """Runs one new position per row of hidden [B, hidden] (contiguous, in the set's dtype:
        bf16 for AVX-512, fp32 for the fp32 set; updated in place) through every layer of
        `plan`: row b at positions[b] of cache row rows[b] (int64 [B] each), with its rotary
        row cos[b] / sin[b] ([B, head_dim], contiguous), writing its keys/values there."""
        status = self._decode_layers(
            plan.dims_address, plan.layers_address, hidden.data_ptr(), hidden.shape[0],
            positions.data_ptr(), rows.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            cache.keys_address, cache.values_address,
            cache.batch_stride, cache.head_stride, scratch.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise RuntimeError(f"{self._prefix}decode_layers failed with status {status}")
