"""The worker command line: TinyChat's flags, and a wrong path refused before any model code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_a_path_without_config_json_is_refused_at_once(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vilaserve.entrypoints.worker.main", "--model-path",
         str(tmp_path / "nowhere"), "--no-register"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "nowhere: no config.json there" in result.stderr
