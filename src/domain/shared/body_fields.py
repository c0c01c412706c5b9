"""Reading typed fields of a JSON request body, shared by the protocols' parsers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vilaserve.domain.shared.errors import InvalidRequest


def flag(body: Mapping[str, Any], key: str, default: bool) -> bool:
    """`body[key]` as a boolean; absent or null is `default`, anything else is refused."""
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{key}' must be a boolean (true or false), got {value!r}")
    return value
