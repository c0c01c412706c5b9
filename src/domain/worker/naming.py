"""How a worker names its model, the way TinyChat and FastChat do."""

from __future__ import annotations

from pathlib import PurePath

W4A16_SUFFIX = "-4bit-AWQ"


def derive_model_name(model_path: str, precision: str, override: str | None = None) -> str:
    """Last path component; `checkpoint-N` is joined to its parent; W4A16 adds `-4bit-AWQ`."""
    if override:
        return override
    parts = [p for p in PurePath(model_path.rstrip("/\\")).parts if p not in ("/", "\\")]
    if not parts:
        raise ValueError(f"cannot derive a model name from path {model_path!r}")
    name = parts[-1]
    if name.startswith("checkpoint-") and len(parts) > 1:
        name = f"{parts[-2]}_{name}"
    if precision.upper() == "W4A16":
        name += W4A16_SUFFIX
    return name
