"""What this host is, for choosing kernel builds: its machine family and, on aarch64 Linux, its
CPU features. (Whether an x86 CPU has an ISA the library asks itself: `*_cpu_supported`.)"""

from __future__ import annotations

import functools
import platform
from pathlib import Path


def machine() -> str:
    """`x86_64` or `aarch64` on the machines the kernels build for (other names as reported)."""
    name = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name, name)


@functools.cache
def arm_features() -> frozenset[str]:
    """aarch64 Linux: the CPU's feature names (`asimddp` for SDOT, `bf16` for BFDOT)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(w for line in lines if line.startswith("Features") for w in line.split()[2:])
