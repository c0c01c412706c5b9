"""Where the project's `shared/` material lives for tests that use it (never required).

`$VILASERVE_SHARED`, else the `shared/` folder beside the repository; a test that needs a file
from it skips, with the path in the reason, when the file is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_dir() -> Path:
    env = os.environ.get("VILASERVE_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared"


def golden_dir(required: str) -> Path:
    """`shared/golden`, or skip the test when `required` is not in it."""
    golden = shared_dir() / "golden"
    if not (golden / required).exists():
        pytest.skip(f"golden data {golden / required} not found (set VILASERVE_SHARED)")
    return golden
