"""Where the built demo model lives, decided without importing torch (so a cached start is fast).

`~/.cache/vilaserve/demo/<key>/{16bit,awq,rtn}/vila-demo`: the key hashes the committed vision
weights and the build format, so new weights (or a new build recipe) build afresh beside the
old ones instead of being served stale. The folder name `vila-demo` becomes the served model
name (`vila-demo`, or `vila-demo-4bit-AWQ` at W4A16).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

Variant = Literal["16bit", "awq", "rtn"]
VARIANTS: tuple[Variant, ...] = ("16bit", "awq", "rtn")
MODEL_DIR_NAME = "vila-demo"

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "demo_vision.safetensors"
PROVENANCE_FILE = WEIGHTS_DIR / "demo_vision.json"

# Bump when the assembled directory or the quantization settings change.
BUILD_FORMAT = "2"
# What every complete variant directory holds; folders are renamed into place only when done.
_COMPLETE_MARKERS = ("config.json", "llm/config.json", "vision_tower/config.json")


def cache_root() -> Path:
    """`$VILASERVE_CACHE/demo`, else `~/.cache/vilaserve/demo`."""
    root = os.environ.get("VILASERVE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vilaserve") / "demo"


def build_key(weights: Path = WEIGHTS_FILE) -> str:
    if not weights.is_file():
        raise FileNotFoundError(
            f"demo vision weights {weights} are missing; train them with "
            "`vilaserve train-demo-vision`"
        )
    digest = hashlib.sha256(f"format {BUILD_FORMAT}\n".encode())
    digest.update(weights.read_bytes())
    return digest.hexdigest()[:16]


def variant_dir(variant: Variant, root: Path | None = None, weights: Path = WEIGHTS_FILE) -> Path:
    base = root if root is not None else cache_root()
    return base / build_key(weights) / variant / MODEL_DIR_NAME


def is_built(directory: Path) -> bool:
    return all((directory / marker).is_file() for marker in _COMPLETE_MARKERS)
