"""Native CPU kernels for decode (and the CPU prefill GEMMs), built on first use and called via
ctypes, one set per ISA:

* ``avx512_bf16`` (int4_matmul.c, matmul.c, decoder.c; AVX-512 BF16 + VNNI): W4A16 and dense
  bf16 matmuls for few rows, attention, RMSNorm, RoPE and the one-call decoder, all in bf16.
* ``avx2``, ``neon``, ``neon_dotprod``, ``neon_bf16`` (fp32_kernels.c with prefill_gemm.c and
  w8a8_gemm.c): W4A16 and dense 16-bit-weight matmuls for few rows with fp32 (or bf16)
  activations, on the same packed layout as the AVX-512 kernel, the one-call decoder in fp32,
  and on AVX2 the W4A8 prefill GEMM and the vision tower's W8A8 GEMM.

When there is no compiler, the CPU lacks the ISA, or the shapes do not fit, the loaders and
`packing.fits()` say so and the caller falls back to PyTorch's kernels.

Modules: `build` compiles a library into the user cache (once per source version, compiler and
flags); `host` tells the machine family and ARM features; `library`, `avx512` and `fp32` are the
ctypes bindings (the entry points both sets share, then each set's own with its loader);
`choice` picks the set this process runs; `packing` puts weights into the kernels' layouts;
`decoder` describes a model and a KV cache to the one-call decoder.

The package itself offers what callers ask at run time: which path runs here and its kernels.
"""

from vilaserve.adapters.worker.cpu_kernels.avx512 import Avx512Kernels, avx512_kernels
from vilaserve.adapters.worker.cpu_kernels.choice import (
    CPU_PATHS,
    FP32_PATHS,
    NativeKernels,
    cpu_path,
    load,
    load_fp32,
)
from vilaserve.adapters.worker.cpu_kernels.fp32 import Fp32Kernels, fp32_kernels

__all__ = [
    "CPU_PATHS",
    "FP32_PATHS",
    "Avx512Kernels",
    "Fp32Kernels",
    "NativeKernels",
    "avx512_kernels",
    "cpu_path",
    "fp32_kernels",
    "load",
    "load_fp32",
]
