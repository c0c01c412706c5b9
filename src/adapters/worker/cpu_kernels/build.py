"""Compiling a kernel library into the user cache, once per source version, compiler and flags.

A build takes a second or two with gcc (no torch headers involved). The library's file name
carries a hash of the compiler's version, the flags and every source and header here, so an
edited source or another compiler builds anew, and an unchanged one loads at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Every build: optimised, a shared library, OpenMP linked by soname (so it shares the
# `libgomp.so.1` torch has loaded, and with it torch's thread pool).
COMMON_CFLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp")


def compiled_library(sources: tuple[Path, ...], cflags: tuple[str, ...], name: str) -> Path:
    """The shared library built from `sources` with `cflags`, compiled now if not cached.

    Raises RuntimeError without a C compiler or when it fails, and OSError when the cache
    cannot be written.
    """
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc/cc) on PATH")
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    digest = hashlib.sha256(version.encode() + " ".join(cflags).encode())
    for path in (*sources, *sorted(HERE.glob("*.h"))):
        digest.update(path.read_bytes())
    target = cache_dir() / f"vilaserve-kernels-{name}-{digest.hexdigest()[:16]}.so"
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


def cache_dir() -> Path:
    root = os.environ.get("VILASERVE_CACHE") or Path.home() / ".cache" / "vilaserve"
    return Path(root) / "kernels"
