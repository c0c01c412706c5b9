"""The controller protocol's request bodies (FastChat / TinyChat field names), parsed and checked.

Every malformed body becomes `InvalidRequest` with a message that names the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vilaserve.domain.shared.errors import InvalidRequest
from vilaserve.domain.shared.worker_status import WorkerStatus


@dataclass(frozen=True)
class Registration:
    worker_name: str  # the worker's URL, e.g. http://10.0.0.5:21002
    check_heart_beat: bool
    worker_status: WorkerStatus | None  # None: the controller asks the worker itself
    multimodal: bool


@dataclass(frozen=True)
class HeartbeatReport:
    worker_name: str
    queue_length: int
    leaving: bool = False  # the worker is shutting down: forget it now


def parse_registration(body: Any) -> Registration:
    body = _object(body, "/register_worker")
    status = body.get("worker_status")
    return Registration(
        worker_name=_worker_name(body),
        check_heart_beat=_flag(body, "check_heart_beat", True),
        worker_status=None if status is None else parse_worker_status(status),
        multimodal=_flag(body, "multimodal", False),
    )


def parse_heartbeat(body: Any) -> HeartbeatReport:
    body = _object(body, "/receive_heart_beat")
    return HeartbeatReport(
        _worker_name(body), _count(body, "queue_length", 0), _flag(body, "leaving", False)
    )


def parse_worker_status(status: Any) -> WorkerStatus:
    """A worker's `/worker_get_status` reply (or the `worker_status` of a registration)."""
    status = _object(status, "worker_status")
    names = status.get("model_names")
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise InvalidRequest("'model_names' must be a list of non-empty strings")
    speed = status.get("speed", 1)
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not 0 <= speed < math.inf:
        raise InvalidRequest(f"'speed' must be a finite number >= 0, got {speed!r}")
    return WorkerStatus(tuple(names), speed, _count(status, "queue_length", 0))


def requested_model(body: Any) -> str:
    """The `model` a generation request names (the controller dispatches on it)."""
    body = _object(body, "the generation request")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            "'model' (a non-empty string) is required: the controller picks a worker by it"
        )
    return model


def _object(body: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest(f"{what} must be a JSON object, got {type(body).__name__}")
    return body


_BARE_URL = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?/?")


def _worker_name(body: Mapping[str, Any]) -> str:
    """A bare `http(s)://host[:port]`: the controller calls this address, so no path, query,
    user info or fragment may ride along."""
    name = body.get("worker_name")
    if not isinstance(name, str) or not _BARE_URL.fullmatch(name):
        raise InvalidRequest(
            "'worker_name' must be the worker's bare http(s) URL, e.g. http://host:21002 (no "
            f"path, query or user info); got {name!r:.200}"
        )
    return name.rstrip("/")


def _flag(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{key}' must be true or false, got {value!r}")
    return value


def _count(body: Mapping[str, Any], key: str, default: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"'{key}' must be an integer >= 0, got {value!r}")
    return value
