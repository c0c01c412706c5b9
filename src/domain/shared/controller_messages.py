"""The controller protocol's request bodies (FastChat / TinyChat field names), parsed and checked.

Every malformed body becomes `InvalidRequest` with a message that names the field.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vilaserve.domain.shared.body_fields import flag
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
        check_heart_beat=flag(body, "check_heart_beat", True),
        worker_status=None if status is None else parse_worker_status(status),
        multimodal=flag(body, "multimodal", False),
    )


def parse_heartbeat(body: Any) -> HeartbeatReport:
    body = _object(body, "/receive_heart_beat")
    return HeartbeatReport(
        _worker_name(body), _count(body, "queue_length", 0), flag(body, "leaving", False)
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


_BARE_URL = re.compile(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?/?")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Every loopback address, `localhost` and the unspecified address reach this machine: one name.
_THIS_MACHINE = "127.0.0.1"


def _worker_name(body: Mapping[str, Any]) -> str:
    """A bare `http(s)://host[:port]`: the controller calls this address, so no path, query,
    user info or fragment may ride along."""
    name = body.get("worker_name")
    if not isinstance(name, str) or _identity_or_none(name) is None:
        raise InvalidRequest(
            "'worker_name' must be the worker's bare http(s) URL, e.g. http://host:21002 (no "
            f"path, query or user info); got {name!r:.200}"
        )
    return name.rstrip("/")


def worker_identity(worker_name: str) -> str:
    """Which worker a `worker_name` (already checked) means: `host:port` with the host as the
    resolver reads it, so that two spellings of one worker are never counted as two.

    IP literals are parsed as `getaddrinfo` parses them (`127.0.0.01`, `127.1`, `0x7f.0.0.1`,
    `[::ffff:127.0.0.1]` are 127.0.0.1), every loopback spelling (`localhost`, `[::1]`,
    `0.0.0.0`) is this machine, the default port is written out. The scheme is left out: one
    socket is one worker whichever protocol a registration claims it speaks. Other names are
    compared as names (not resolved: that is I/O, and their addresses may change)."""
    identity = _identity_or_none(worker_name)
    if identity is None:
        raise ValueError(f"not a bare http(s) worker URL: {worker_name!r:.200}")
    return identity


def _identity_or_none(worker_name: str) -> str | None:
    match = _BARE_URL.fullmatch(worker_name)
    if match is None:
        return None
    scheme, host, port_text = match.groups()
    port = int(port_text) if port_text else _DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        return None
    canonical = _canonical_host(host)
    return None if canonical is None else f"{canonical}:{port}"


def _canonical_host(host: str) -> str | None:
    """The host as one spelling; None for an IPv6 literal that does not parse."""
    if host.startswith("["):
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    else:
        parsed = _inet_aton(host)
        if parsed is None:
            name = host.lower().removesuffix(".")
            # RFC 6761: `localhost` and every name under it are loopback.
            is_loopback = name == "localhost" or name.endswith(".localhost")
            return _THIS_MACHINE if is_loopback else name
        ip = parsed
    if ip.is_loopback or ip.is_unspecified:
        return _THIS_MACHINE
    return str(ip) if ip.version == 4 else f"[{ip.compressed}]"


_C_NUMBER = re.compile(r"0[xX][0-9A-Fa-f]+|0[0-7]*|[1-9][0-9]*")


def _inet_aton(text: str) -> ipaddress.IPv4Address | None:
    """An IPv4 address as the C library's `inet_aton` (and so `getaddrinfo`) reads it: one to
    four parts, each decimal, octal (leading 0) or hex (0x); the last part fills the bytes
    left. None when `text` is not one (a host name)."""
    parts = text.split(".")
    if len(parts) > 4 or not all(_C_NUMBER.fullmatch(p) for p in parts):
        return None
    values = [
        int(p, 0) if p[:2].lower() == "0x" else int(p, 8 if p[0] == "0" else 10) for p in parts
    ]
    *leading, last = values
    last_bytes = 4 - len(leading)
    if any(v > 255 for v in leading) or last >= 256**last_bytes:
        return None
    number = 0
    for value in leading:
        number = number * 256 + value
    return ipaddress.IPv4Address(number * 256**last_bytes + last)


def _count(body: Mapping[str, Any], key: str, default: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"'{key}' must be an integer >= 0, got {value!r}")
    return value
