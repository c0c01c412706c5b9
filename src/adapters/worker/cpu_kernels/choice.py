"""Which kernel set this process runs on the CPU: `cpu_path()` names it, one of `CPU_PATHS`.

Chosen once from the CPU's features, the fastest set that builds and runs here;
`VILASERVE_CPU_PATH` forces one (tests force each one the machine can run). `load()` and
`load_fp32()` give the chosen set's kernels, or None when the chosen path is another.
"""

from __future__ import annotations

import functools
import os

from vilaserve.adapters.worker.cpu_kernels.avx512 import Avx512Kernels, avx512_kernels
from vilaserve.adapters.worker.cpu_kernels.fp32 import PATHS as FP32_PATHS
from vilaserve.adapters.worker.cpu_kernels.fp32 import Fp32Kernels, fp32_kernels

# In order of speed; `torch` is PyTorch's own ops.
CPU_PATHS = ("avx512_bf16", *FP32_PATHS, "torch")

NativeKernels = Avx512Kernels | Fp32Kernels


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
    # Paths of another ISA family answer None at once.
    return next((path for path in CPU_PATHS[:-1] if _kernels_for(path) is not None), "torch")


def _kernels_for(path: str) -> NativeKernels | None:
    return avx512_kernels() if path == "avx512_bf16" else fp32_kernels(path)


def load() -> Avx512Kernels | None:
    """The AVX-512 kernel set when it is this process's CPU path, else None (what `auto`
    choices go by; an explicit choice asks `avx512_kernels()`)."""
    return avx512_kernels() if cpu_path() == "avx512_bf16" else None


def load_fp32() -> Fp32Kernels | None:
    """The fp32 kernel set (AVX2 or NEON) when it is this process's CPU path, else None."""
    path = cpu_path()
    return fp32_kernels(path) if path in FP32_PATHS else None
