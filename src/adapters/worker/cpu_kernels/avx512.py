"""The AVX-512 kernel set: int4_matmul.c, matmul.c and decoder.c, for x86 CPUs with AVX-512
BF16 + VNNI, computing in bf16. `avx512_kernels()` builds and loads it where it can run."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess

import torch
from torch import Tensor

from vilaserve.adapters.worker.cpu_kernels import host
from vilaserve.adapters.worker.cpu_kernels.build import COMMON_CFLAGS, HERE, compiled_library
from vilaserve.adapters.worker.cpu_kernels.library import KernelLibrary
from vilaserve.adapters.worker.cpu_kernels.packing import PackedInt4

log = logging.getLogger(__name__)

SOURCES = (HERE / "int4_matmul.c", HERE / "matmul.c", HERE / "decoder.c")
CFLAGS = (
    *COMMON_CFLAGS,
    "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma", "-mf16c",
)  # fmt: skip


class Avx512Kernels(KernelLibrary):
    """int4_matmul.c, matmul.c and decoder.c built for AVX-512 BF16 + VNNI: the W4A16 and dense
    bf16 matmuls for few rows, attention, RMSNorm, RoPE and the bf16 one-call decoder."""

    def __init__(self, library: ctypes.CDLL) -> None:
        super().__init__(library, "vs_")
        i64, ptr, flag = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self._matmul = library.vs_int4_matmul
        self._matmul.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, ptr, flag, flag]
        self._matmul.restype = ctypes.c_int
        self._dense = library.vs_bf16_matmul
        self._dense.argtypes = [ptr, i64, ptr, i64, i64, ptr, flag, flag]
        self._dense.restype = ctypes.c_int
        self._attention = library.vs_decode_attention
        self._attention.argtypes = [ptr, ptr, ptr, *[i64] * 7, ctypes.c_float, ptr, flag]
        self._attention.restype = ctypes.c_int
        self._rms_norm = library.vs_rms_norm
        self._rms_norm.argtypes = [ptr, i64, i64, ptr, ctypes.c_float, ptr]
        self._rms_norm.restype = ctypes.c_int
        self._rope = library.vs_rope
        self._rope.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, i64, i64]
        self._rope.restype = ctypes.c_int

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_avx512_or_fail, ())

    def matmul(self, x: Tensor, w: PackedInt4, n: int, group: int, out: Tensor) -> None:
        """out[M, N] (bf16 or fp32) = x[M, K] (bf16, contiguous) @ W^T."""
        m, k = x.shape
        status = self._matmul(
            x.data_ptr(), m, w.weight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(),
            n, k, group, out.data_ptr(), out.dtype == torch.float32, torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise RuntimeError(f"vs_int4_matmul failed with status {status}")

    def dense_matmul(self, x: Tensor, weight: Tensor, out: Tensor) -> None:
        """out[M, N] (bf16 or fp32) = x[M, K] @ weight[N, K]^T, both bf16 and contiguous."""
        m, k = x.shape
        status = self._dense(
            x.data_ptr(), m, weight.data_ptr(), weight.shape[0], k, out.data_ptr(),
            out.dtype == torch.float32, torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise RuntimeError(f"vs_bf16_matmul failed with status {status}")

    def decode_attention(self, q: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
        """softmax(q k^T * scale) v for one query per row and head, all bf16 on CPU.

        q: [B, H, 1, D] contiguous; keys/values: [B, KVH, T, D] views of a cache whose rows
        are contiguous (stride D); returns [B, H, 1, D].
        """
        batch, heads, _, dim = q.shape
        kv_heads, length = keys.shape[1], keys.shape[2]
        out = torch.empty_like(q)
        status = self._attention(
            q.data_ptr(), keys.data_ptr(), values.data_ptr(), batch, heads, kv_heads, length,
            dim, keys.stride(0), keys.stride(1), scale, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise RuntimeError(f"vs_decode_attention failed with status {status}")
        return out

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """HF LlamaRMSNorm of bf16 rows (weight bf16), bit-exact up to the fp32 sum order."""
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.empty_like(rows)
        if self._rms_norm(rows.data_ptr(), rows.shape[0], rows.shape[1], weight.data_ptr(), eps,
                          out.data_ptr()):  # fmt: skip
            raise RuntimeError("vs_rms_norm refused the shape")
        return out.view(x.shape)

    def rope(self, src: Tensor, cos: Tensor, sin: Tensor, dst: Tensor) -> None:
        """dst = rotary(src) for one position. src: [B, H, D] with contiguous heads (any batch
        stride); dst: [B, H, D] with any batch/head strides and contiguous D (a cache row)."""
        batch, heads, dim = src.shape
        if src.stride(1) != dim or src.stride(2) != 1 or dst.stride(2) != 1:
            raise ValueError("rope needs contiguous heads in src and contiguous rows in dst")
        status = self._rope(
            src.data_ptr(), batch, heads, dim, src.stride(0), cos.data_ptr(), sin.data_ptr(),
            dst.data_ptr(), dst.stride(0), dst.stride(1),
        )  # fmt: skip
        if status:
            raise RuntimeError("vs_rope refused the shape")


@functools.cache
def avx512_kernels() -> Avx512Kernels | None:
    """The AVX-512 set if this CPU and compiler can run it, or None (logged once)."""
    if os.environ.get("VILASERVE_DISABLE_AVX512_KERNEL"):
        return None
    if host.machine() != "x86_64":
        return None
    try:
        library = ctypes.CDLL(str(compiled_library(SOURCES, CFLAGS, "avx512")))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        log.warning(
            "AVX-512 W4A16 kernel unavailable, using PyTorch's int4 kernel",
            extra={"reason": str(exc)},
        )
        return None
    if not library.vs_cpu_supported():
        log.info("this CPU lacks AVX-512 BF16 or VNNI")
        return None
    return Avx512Kernels(library)


def _avx512_or_fail() -> Avx512Kernels:
    kernels = avx512_kernels()
    if kernels is None:
        raise RuntimeError("this model was built with the AVX-512 kernels, which cannot run here")
    return kernels
