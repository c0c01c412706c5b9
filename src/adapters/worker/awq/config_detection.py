"""Whether a checkpoint's LLM holds AWQ weights, read from its `config.json` alone.

Apart from loading.py (which imports torch) so that a caller that only asks, `vilaserve chat`
deciding which model a running stack must serve, does not wait for torch to import."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def is_awq_config(config: Mapping[str, Any]) -> bool:
    """Whether an HF `config.json` dict declares AWQ weights (`quant_method: awq`)."""
    quant = config.get("quantization_config") or {}
    return str(quant.get("quant_method", "")).lower() == "awq"


def has_awq_config(directory: Path) -> bool:
    config = directory / "config.json"
    return config.is_file() and is_awq_config(json.loads(config.read_text()))
