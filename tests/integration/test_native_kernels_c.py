"""fp32_kernels.c checked at the C level (tests/native/fp32_kernels_check.c) for every ISA it
builds for: AVX2 natively on x86, NEON under qemu-aarch64 (plain, with the dot-product
extension, and with dot product and BF16). The harness checks each kernel (int4 dequantize and
matmul, dense bf16 / fp16 matmul, the one-call decoder) against scalar references in double.

The ARM builds need Debian's `gcc-aarch64-linux-gnu` and `qemu-user` (`.ci/run` installs them);
without them those cases skip, saying so. Speed on ARM is not measured here.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from vilaserve.adapters.worker import cpu_kernels
from vilaserve.adapters.worker.cpu_kernels import fp32
from vilaserve.adapters.worker.cpu_kernels.build import HERE as KERNEL_SOURCES

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "tests" / "native" / "fp32_kernels_check.c"
WARNINGS = ("-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-Wno-unknown-pragmas")


def isa_flags(path: str) -> list[str]:
    """The product's own ISA flags for `path`, without those that make a shared library."""
    shared = {"-fPIC", "-shared", "-fopenmp"}
    return [f for f in fp32.CFLAGS_BY_PATH[path] if f not in shared]


def build(compiler: str, path: str, out: Path, static: bool) -> None:
    command = [compiler, *isa_flags(path), *WARNINGS, f"-I{KERNEL_SOURCES}", str(HARNESS)]
    command += [*(["-static"] if static else []), "-o", str(out), "-lm"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all kernel checks passed" in result.stdout
    return result.stdout


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or cpu_kernels.fp32_kernels() is None,
    reason="needs an x86-64 CPU with AVX2 + FMA + F16C and gcc",
)
def test_avx2_build_passes_the_c_checks(tmp_path: Path) -> None:
    binary = tmp_path / "check-avx2"
    build(shutil.which("gcc") or "cc", "avx2", binary, static=False)
    run([str(binary)])


CROSS = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


@pytest.mark.skipif(
    CROSS is None or QEMU is None,
    reason="needs Debian's gcc-aarch64-linux-gnu and qemu-user (apt-get install both)",
)
@pytest.mark.parametrize(
    ("path", "cpu"),
    [("neon_bf16", "max"), ("neon_dotprod", "max"), ("neon", "max"), ("neon", "cortex-a53")],
    ids=["neon_bf16", "neon_dotprod", "neon", "neon-on-a53"],
)
def test_neon_builds_pass_the_c_checks_under_qemu(path: str, cpu: str, tmp_path: Path) -> None:
    """`cortex-a53` has no dot product: the plain NEON build must not use it."""
    assert CROSS is not None and QEMU is not None
    binary = tmp_path / f"check-{path}"
    build(CROSS, path, binary, static=True)
    run([QEMU, "-cpu", cpu, str(binary)])
