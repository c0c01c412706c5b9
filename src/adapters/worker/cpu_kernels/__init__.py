"""Native CPU kernels for decode, built on first use and called via ctypes, one set per ISA.

* ``avx512_bf16`` (int4_matmul.c, matmul.c, decoder.c; AVX-512 BF16 + VNNI): W4A16 and dense
  bf16 matmuls for few rows, attention, RMSNorm, RoPE and the one-call decoder, all in bf16.
* ``avx2``, ``neon``, ``neon_dotprod``, ``neon_bf16`` (fp32_kernels.c, one source with a
  section per ISA; AVX2 + FMA + F16C on any x86-64 of the last decade, NEON on any aarch64,
  `sdot` where the CPU has the dot-product extension, `bfdot` where it also has BF16): W4A16
  and dense 16-bit-weight matmuls for few rows with fp32 (or bf16) activations, the W4A16 ones
  on the same packed layout as the AVX-512 kernel, and the one-call decoder in fp32.

Each set is compiled once per source version and compiler into the user cache (a second or
two with gcc; no torch headers involved) and loaded into the process. It links OpenMP by soname,
so it shares the `libgomp.so.1` that torch has already loaded, and with it torch's thread pool.
When there is no compiler, the CPU lacks the ISA, or the shapes do not fit (N % 16, K % 64,
group % 64, group <= 2048), `load()` / `load_fp32()` / `fits()` say so and the caller falls
back to PyTorch's kernels. `cpu_path()` names the set this process uses (`VILASERVE_CPU_PATH`
forces one of `CPU_PATHS`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vilaserve.adapters.worker.awq.quantized_weight import QuantizedWeight
from vilaserve.adapters.worker.cpu_kernels.decoder import CachePointers, DecoderPlan

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "int4_matmul.c", HERE / "matmul.c", HERE / "decoder.c")
HEADERS = (HERE / "kernels.h", HERE / "plan.h")
CFLAGS = (
    "-O3", "-fPIC", "-shared", "-fopenmp",
    "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma",
    "-mf16c",
)  # fmt: skip
FP32_SOURCES = (HERE / "fp32_kernels.c", HERE / "prefill_gemm.c", HERE / "w8a8_gemm.c")
FP32_HEADERS = (HERE / "plan.h", HERE / "avx2_rows.h")
_COMMON_CFLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp")
# The fp32 set's builds: ISA flags per CPU path (the C source picks its sections from them).
FP32_CFLAGS = {
    "avx2": (*_COMMON_CFLAGS, "-mavx2", "-mfma", "-mf16c"),
    "neon": (*_COMMON_CFLAGS, "-march=armv8-a"),
    "neon_dotprod": (*_COMMON_CFLAGS, "-march=armv8.2-a+dotprod+fp16"),
    "neon_bf16": (*_COMMON_CFLAGS, "-march=armv8.6-a+fp16"),  # 8.6: dotprod and BF16
}
CPU_PATHS = ("avx512_bf16", "avx2", "neon_bf16", "neon_dotprod", "neon", "torch")
# The aarch64 builds and the CPU features (/proc/cpuinfo) each needs.
_ARM_FEATURES = {"neon": (), "neon_dotprod": ("asimddp",), "neon_bf16": ("asimddp", "bf16")}
TILE_ROWS = 16
BLOCK = 64
MAX_GROUP = 2048  # keeps the kernel's int32 partial sums exact (int4_matmul.c)


@dataclass(frozen=True)
class PackedInt4:
    """One linear layer in the kernel's layout (see the C file's header comment)."""

    weight: Tensor  # uint8 [N * K / 2]
    scales: Tensor  # float16 [N / 16, K / group, 16]
    zeros: Tensor  # uint8 [N / 16, K / group, 16]


@dataclass(frozen=True)
class PackedInt8:
    """One linear layer for w8a8_gemm.c: int8 weights in tiles of 8 channels x 4 columns."""

    weight: Tensor  # int8 [N / 8, K / 4, 8, 4]
    scales: Tensor  # float32 [N]: w = q * scale
    sums: Tensor  # int32 [N]: each channel's sum of q (the kernel's unsigned offset comes out)


def w8a8_fits(out_features: int, in_features: int) -> bool:
    return out_features % 16 == 0 and in_features % 8 == 0


def pack_int8(q: Tensor, scales: Tensor) -> PackedInt8:
    """int8 q [N, K] with per-channel fp32 scales, in w8a8_gemm.c's layout."""
    n, k = q.shape
    if not w8a8_fits(n, k):
        raise ValueError(f"the W8A8 kernel needs N % 16 == 0 and K % 8 == 0; got {n}x{k}")
    tiles = q.view(n // 8, 8, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    return PackedInt8(tiles, scales.float().contiguous(), q.sum(1, dtype=torch.int32))


def fits(out_features: int, in_features: int, group_size: int) -> bool:
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


class _NativeSet:
    """What both kernel sets export with one signature under their own prefix (`vs_` for
    AVX-512, `vsf_` for the fp32 set): the int4 dequantize and the one-call decoder."""

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
    def __deepcopy__(self, memo: dict[int, object]) -> _NativeSet:
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


class CpuKernels(_NativeSet):
    def __init__(self, library: ctypes.CDLL) -> None:
        super().__init__(library, "vs_")
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._matmul = library.vs_int4_matmul
        self._matmul.argtypes = [
            ptr,
            i64,
            ptr,
            ptr,
            ptr,
            i64,
            i64,
            i64,
            ptr,
            ctypes.c_int,
            ctypes.c_int,
        ]
        self._matmul.restype = ctypes.c_int
        self._dense = library.vs_bf16_matmul
        self._dense.argtypes = [ptr, i64, ptr, i64, i64, ptr, ctypes.c_int, ctypes.c_int]
        self._dense.restype = ctypes.c_int
        self._attention = library.vs_decode_attention
        self._attention.argtypes = [ptr, ptr, ptr, *[i64] * 7, ctypes.c_float, ptr, ctypes.c_int]
        self._attention.restype = ctypes.c_int
        self._rms_norm = library.vs_rms_norm
        self._rms_norm.argtypes = [ptr, i64, i64, ptr, ctypes.c_float, ptr]
        self._rms_norm.restype = ctypes.c_int
        self._rope = library.vs_rope
        self._rope.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, i64, i64]
        self._rope.restype = ctypes.c_int

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_load_or_fail, ())

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
        stride); dst: [B, H, D] with any batch/head strides and contiguous D (a cache slot)."""
        batch, heads, dim = src.shape
        if src.stride(1) != dim or src.stride(2) != 1 or dst.stride(2) != 1:
            raise ValueError("rope needs contiguous heads in src and contiguous rows in dst")
        status = self._rope(
            src.data_ptr(), batch, heads, dim, src.stride(0), cos.data_ptr(), sin.data_ptr(),
            dst.data_ptr(), dst.stride(0), dst.stride(1),
        )  # fmt: skip
        if status:
            raise RuntimeError("vs_rope refused the shape")


class Fp32Kernels(_NativeSet):
    """fp32_kernels.c built for one ISA: the W4A16 and dense matmuls for few rows (fp32 or bf16
    activations) and the fp32 one-call decoder."""

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


NativeKernels = CpuKernels | Fp32Kernels


def cpu_path() -> str:
    """The kernel set this process runs on the CPU, one of `CPU_PATHS` (torch: PyTorch's own
    ops). Chosen once from the CPU's features; `VILASERVE_CPU_PATH` forces a path (tests force
    each one the machine can run), and a forced path this CPU cannot run is refused."""
    return _chosen_path(os.environ.get("VILASERVE_CPU_PATH", "auto"))


@functools.cache
def _chosen_path(wanted: str) -> str:
    if wanted not in ("auto", *CPU_PATHS):
        raise ValueError(f"VILASERVE_CPU_PATH={wanted}: choose from auto, {', '.join(CPU_PATHS)}")
    if wanted == "torch":
        return "torch"
    if wanted != "auto":
        if _kernels_for(wanted) is None:
            raise ValueError(f"VILASERVE_CPU_PATH={wanted}, but that kernel set cannot run here")
        return wanted
    # CPU_PATHS is in order of speed; paths of another ISA family answer None at once.
    return next((path for path in CPU_PATHS[:-1] if _kernels_for(path) is not None), "torch")


def _kernels_for(path: str) -> NativeKernels | None:
    return avx512_kernels() if path == "avx512_bf16" else fp32_kernels(path)


def load() -> CpuKernels | None:
    """The AVX-512 kernel set when it is this process's CPU path, else None (what `auto`
    choices go by; an explicit choice asks `avx512_kernels()`)."""
    return avx512_kernels() if cpu_path() == "avx512_bf16" else None


def load_fp32() -> Fp32Kernels | None:
    """The fp32 kernel set (AVX2 or NEON) when it is this process's CPU path, else None."""
    path = cpu_path()
    return fp32_kernels(path) if path in FP32_CFLAGS else None


def fp32_kernels(path: str | None = None) -> Fp32Kernels | None:
    """The fp32 set built for `path` (default: the one for this CPU's ISA family) if this CPU
    and compiler can run it, whatever the chosen path."""
    if path is None:
        fastest = (_fp32_kernels(p) for p in CPU_PATHS if p in FP32_CFLAGS)
        return next((kernels for kernels in fastest if kernels is not None), None)
    return _fp32_kernels(path)


@functools.cache
def _fp32_kernels(path: str) -> Fp32Kernels | None:
    family = "x86_64" if path == "avx2" else "aarch64"
    if _machine() != family or (family == "aarch64" and not _arm_has(path)):
        return None
    try:
        library = ctypes.CDLL(str(_build(FP32_SOURCES, FP32_HEADERS, FP32_CFLAGS[path], path)))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        log.warning("fp32 kernels unavailable", extra={"path": path, "reason": str(exc)})
        return None
    if not library.vsf_cpu_supported():
        log.info("this CPU lacks what the fp32 kernels need", extra={"path": path})
        return None
    return Fp32Kernels(library, path)


def _machine() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _arm_has(path: str) -> bool:
    return all(feature in _arm_features() for feature in _ARM_FEATURES[path])


@functools.cache
def _arm_features() -> frozenset[str]:
    """aarch64 Linux: the CPU's feature names (`asimddp` for SDOT, `bf16` for BFDOT)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(w for line in lines if line.startswith("Features") for w in line.split()[2:])


def _fp32_or_fail(path: str) -> Fp32Kernels:
    kernels = _fp32_kernels(path)
    if kernels is None:
        raise RuntimeError(f"this model was built with the {path} kernels, which cannot run here")
    return kernels


@functools.cache
def avx512_kernels() -> CpuKernels | None:
    """The AVX-512 set if this CPU and compiler can run it, or None (logged once)."""
    if os.environ.get("VILASERVE_DISABLE_AVX512_KERNEL"):
        return None
    if _machine() != "x86_64":
        return None
    try:
        library = ctypes.CDLL(str(_build(SOURCES, HEADERS, CFLAGS, "avx512")))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        log.warning(
            "AVX-512 W4A16 kernel unavailable, using PyTorch's int4 kernel",
            extra={"reason": str(exc)},
        )
        return None
    if not library.vs_cpu_supported():
        log.info("this CPU lacks AVX-512 BF16 or VNNI")
        return None
    return CpuKernels(library)


def _load_or_fail() -> CpuKernels:
    kernels = avx512_kernels()
    if kernels is None:
        raise RuntimeError("this model was built with the AVX-512 kernels, which cannot run here")
    return kernels


def _cache_dir() -> Path:
    root = os.environ.get("VILASERVE_CACHE") or Path.home() / ".cache" / "vilaserve"
    return Path(root) / "kernels"


def _build(
    sources: tuple[Path, ...], headers: tuple[Path, ...], cflags: tuple[str, ...], isa: str
) -> Path:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc/cc) on PATH")
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    digest = hashlib.sha256(version.encode() + " ".join(cflags).encode())
    for path in (*sources, *headers):
        digest.update(path.read_bytes())
    target = _cache_dir() / f"vilaserve-kernels-{isa}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build to a private name, then rename: concurrent first uses never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *cflags, "-o", str(built), *map(str, sources)],
            capture_output=True,
            text=True,
        )
        if result.returncode:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target
