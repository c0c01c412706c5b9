"""The fp32 kernel set: fp32_kernels.c (with prefill_gemm.c and w8a8_gemm.c), one source with a
section per ISA, for CPUs without native bf16 arithmetic: AVX2 + FMA + F16C on any x86-64 of the
last decade, NEON on any aarch64, `sdot` where the CPU has the dot-product extension, `bfdot`
where it also has BF16. Activations are fp32 (or bf16) and weights stay 4-bit or 16-bit.
`fp32_kernels(path)` builds and loads the set for one of `PATHS` where it can run.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
from typing import Any

import torch
from torch import Tensor

from vilaserve.adapters.worker.cpu_kernels import host
from vilaserve.adapters.worker.cpu_kernels.build import COMMON_CFLAGS, HERE, compiled_library
from vilaserve.adapters.worker.cpu_kernels.library import KernelLibrary
from vilaserve.adapters.worker.cpu_kernels.packing import PackedInt4, PackedInt8

log = logging.getLogger(__name__)

SOURCES = (HERE / "fp32_kernels.c", HERE / "prefill_gemm.c", HERE / "w8a8_gemm.c")
# The set's CPU paths, fastest first, and the ISA flags of each build (the C source picks its
# sections from them).
PATHS = ("avx2", "neon_bf16", "neon_dotprod", "neon")
CFLAGS_BY_PATH = {
    "avx2": (*COMMON_CFLAGS, "-mavx2", "-mfma", "-mf16c"),
    "neon": (*COMMON_CFLAGS, "-march=armv8-a"),
    "neon_dotprod": (*COMMON_CFLAGS, "-march=armv8.2-a+dotprod+fp16"),
    "neon_bf16": (*COMMON_CFLAGS, "-march=armv8.6-a+fp16"),  # 8.6: dotprod and BF16
}
# The CPU features (/proc/cpuinfo) each aarch64 build needs.
_ARM_FEATURES = {"neon": (), "neon_dotprod": ("asimddp",), "neon_bf16": ("asimddp", "bf16")}


class Fp32Kernels(KernelLibrary):
    """fp32_kernels.c (with prefill_gemm.c and w8a8_gemm.c) built for one ISA: the W4A16, dense
    16-bit and int8 matmuls for few rows (fp32 or bf16 activations), the fp32 one-call decoder,
    and where the build has them (AVX2) the W4A8 prefill GEMM and the W8A8 GEMM."""

    def __init__(self, library: ctypes.CDLL, path: str) -> None:
        super().__init__(library, "vsf_")
        self.path = path
        i64, ptr, flag = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self._matmul = library.vsf_int4_matmul
        self._matmul.argtypes = [ptr, flag, i64, ptr, ptr, ptr, i64, i64, i64, ptr, i64, flag, flag]
        self._matmul.restype = ctypes.c_int
        self._dense = library.vsf_dense_matmul
        self._dense.argtypes = [ptr, flag, i64, ptr, flag, i64, i64, ptr, i64, flag, flag]
        self._dense.restype = ctypes.c_int
        self._int8 = library.vsf_int8_matmul
        self._int8.argtypes = [ptr, i64, ptr, ptr, i64, i64, ptr, i64, flag]
        self._int8.restype = ctypes.c_int
        self._gemm = library.vsf_int4_gemm
        self._gemm.argtypes = [ptr, flag, i64, ptr, ptr, ptr, i64, i64, i64, ptr, i64, flag, flag]
        self._gemm.restype = ctypes.c_int
        # prefill_gemm.c: the W4A8 GEMM for many rows (AVX2 builds; other ISAs lack one yet).
        self.has_gemm = bool(library.vsf_gemm_supported())
        self._w8a8 = library.vsf_w8a8_gemm
        self._w8a8.argtypes = [ptr, flag, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, flag]
        self._w8a8.restype = ctypes.c_int
        # w8a8_gemm.c: the vision tower's int8 GEMM (AVX2 builds).
        self.has_w8a8 = bool(library.vsf_w8a8_supported())

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_fp32_or_fail, (self.path,))

    def matmul(self, x: Tensor, w: PackedInt4, n: int, group: int, out: Tensor) -> None:
        """out[M, N] (fp32 or bf16) = x[M, K] (fp32 or bf16, contiguous) @ W^T."""
        self._int4(self._matmul, "vsf_int4_matmul", x, w, n, group, out)

    def gemm(self, x: Tensor, w: PackedInt4, n: int, group: int, out: Tensor) -> None:
        """out[M, N] (fp32 or bf16) = x[M, K] (fp32 or bf16, contiguous) @ W^T for many rows:
        x rounded to 8 bits per 32 columns (prefill_gemm.c). Needs `has_gemm`."""
        self._int4(self._gemm, "vsf_int4_gemm", x, w, n, group, out)

    @staticmethod
    def _int4(
        fn: Any, name: str, x: Tensor, w: PackedInt4, n: int, group: int, out: Tensor
    ) -> None:
        """The decode kernel and the prefill GEMM take the same arguments."""
        m, k = x.shape
        status = fn(
            x.data_ptr(), x.dtype == torch.float32, m, w.weight.data_ptr(), w.scales.data_ptr(),
            w.zeros.data_ptr(), n, k, group, out.data_ptr(), n, out.dtype == torch.float32,
            torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise RuntimeError(f"{name} failed with status {status}")

    def w8a8_gemm(self, x: Tensor, w: PackedInt8, bias: Tensor | None, out: Tensor) -> None:
        """out[M, N] (fp32) = x[M, K] (fp32 or bf16, contiguous; 7 bits per row) @ W^T + bias
        (w8a8_gemm.c). Needs `has_w8a8`, N % 16 == 0 and K % 8 == 0."""
        m, k = x.shape
        status = self._w8a8(
            x.data_ptr(), x.dtype == torch.float32, m, w.weight.data_ptr(), w.scales.data_ptr(),
            w.sums.data_ptr(), None if bias is None else bias.data_ptr(), w.scales.shape[0], k,
            out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise RuntimeError(f"vsf_w8a8_gemm failed with status {status}")

    def dense_matmul(self, x: Tensor, weight: Tensor, out: Tensor) -> None:
        """out[M, N] (fp32 or bf16) = x[M, K] (fp32 or bf16) @ weight[N, K]^T (bf16 or fp16);
        all contiguous, K % 8 == 0."""
        m, k = x.shape
        status = self._dense(
            x.data_ptr(), x.dtype == torch.float32, m, weight.data_ptr(),
            weight.dtype == torch.float16, weight.shape[0], k, out.data_ptr(), weight.shape[0],
            out.dtype == torch.float32, torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise RuntimeError(f"vsf_dense_matmul failed with status {status}")

    def int8_matmul(self, x: Tensor, table: Tensor, scales: Tensor, out: Tensor) -> None:
        """out[M, N] = x[M, K] @ (scales * table)^T: x, scales [N] and out fp32, table int8
        [N, K]; all contiguous, K % 8 == 0."""
        m, k = x.shape
        status = self._int8(
            x.data_ptr(), m, table.data_ptr(), scales.data_ptr(), table.shape[0], k,
            out.data_ptr(), table.shape[0], torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise RuntimeError(f"vsf_int8_matmul failed with status {status}")


def fp32_kernels(path: str | None = None) -> Fp32Kernels | None:
    """The fp32 set built for `path` (default: the fastest this CPU runs) if this CPU and
    compiler can run it, whatever the chosen path."""
    if path is None:
        fastest = (_fp32_kernels(p) for p in PATHS)
        return next((kernels for kernels in fastest if kernels is not None), None)
    return _fp32_kernels(path)


@functools.cache
def _fp32_kernels(path: str) -> Fp32Kernels | None:
    family = "x86_64" if path == "avx2" else "aarch64"
    if host.machine() != family or (family == "aarch64" and not _arm_has(path)):
        return None
    try:
        library = ctypes.CDLL(str(compiled_library(SOURCES, CFLAGS_BY_PATH[path], path)))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        log.warning("fp32 kernels unavailable", extra={"path": path, "reason": str(exc)})
        return None
    if not library.vsf_cpu_supported():
        log.info("this CPU lacks what the fp32 kernels need", extra={"path": path})
        return None
    return Fp32Kernels(library, path)


def _arm_has(path: str) -> bool:
    return all(feature in host.arm_features() for feature in _ARM_FEATURES[path])


def _fp32_or_fail(path: str) -> Fp32Kernels:
    kernels = _fp32_kernels(path)
    if kernels is None:
        raise RuntimeError(f"this model was built with the {path} kernels, which cannot run here")
    return kernels
