"""Who may call the worker and the controller: holders of the internal token, by their names.

The API is the stack's door: it checks users' keys. The worker and the controller behind it
have no users of their own, so without more any process on the host (or a web page a browser
opened there) could ask them for generations directly, past the keys. Two checks close that:

- the **internal token** (`VILASERVE_INTERNAL_TOKEN`; `vilaserve serve` makes one per run when
  the API has keys): every route but the open ones needs `Authorization: Bearer <token>`; the
  API, the controller and `serve` send it;
- the **Host header** of a service bound to loopback must name this machine (or an address it
  was told it is reached by): a page from another origin that re-binds its own name to
  127.0.0.1 (DNS rebinding) sends its own name as Host and is refused.

Both answer in the worker protocol's error shape, `{"text", "error_code"}`.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from vilaserve.domain.shared.errors import ErrorCode

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


async def _refuse(send: Send, status: int, text: str, code: ErrorCode) -> None:
    body = json.dumps({"text": text, "error_code": int(code)}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def bearer_token(authorization: str) -> str:
    """The token of an `Authorization: Bearer <token>` header; "" for none or another scheme."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return ""


class RequireInternalToken:
    """Refuses (401, 40101/40102) a request to any path outside `open_paths` that does not
    carry the token."""

    def __init__(self, app: ASGIApp, token: str, open_paths: Iterable[str] = ()) -> None:
        self.app = app
        self._token = token.encode()
        self._open = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open:
            await self.app(scope, receive, send)
            return
        token = bearer_token(_header(scope, b"authorization"))
        if not token:
            await _refuse(
                send,
                401,
                "this service takes requests from the stack only: send 'Authorization: Bearer "
                "<internal token>' (VILASERVE_INTERNAL_TOKEN)",
                ErrorCode.INVALID_AUTH_KEY,
            )
            return
        if not hmac.compare_digest(token.encode(), self._token):
            await _refuse(send, 401, "the internal token is wrong", ErrorCode.INCORRECT_AUTH_KEY)
            return
        await self.app(scope, receive, send)


def host_of(header: str) -> str | None:
    """The host name or address in a Host header (no port, no brackets, lower case)."""
    try:
        host = urlsplit("//" + header).hostname
    except ValueError:
        return None
    return host.rstrip(".").lower() if host else None


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def guard_internal_service(
    app: FastAPI,
    token: str | None,
    open_paths: Iterable[str],
    bind_host: str,
    advertised: Iterable[str],
    extra_hosts: str,
) -> None:
    """The worker's and the controller's two checks: the internal token (when set) on every
    path but `open_paths`, and the Host header (see `allowed_hosts`)."""
    if token:
        app.add_middleware(RequireInternalToken, token=token, open_paths=set(open_paths))
    app.add_middleware(CheckHost, allowed=allowed_hosts(bind_host, advertised, extra_hosts))


def add_allowed_hosts_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allowed-hosts",
        help="comma-separated extra names this service may be called by (Host header); bound "
        "to 127.0.0.1 it answers only to this machine's names otherwise",
    )


def allowed_hosts(bind_host: str, advertised: Iterable[str], extra: str) -> frozenset[str]:
    """The names a service may be called by: the machine's loopback names, the address it binds
    and the URLs it is advertised at, and the comma-separated `extra`. Empty: any (a service
    bound to all interfaces is reached by names it cannot know, unless `extra` lists them)."""
    names = {h for h in (host_of(e.strip()) for e in extra.split(",") if e.strip()) if h}
    if not is_loopback(bind_host) and not names:
        return frozenset()
    names |= LOOPBACK_NAMES
    bound = host_of(bind_host if ":" not in bind_host else f"[{bind_host}]")
    if bound and bound not in ("0.0.0.0", "::"):
        names.add(bound)
    for url in advertised:
        if host := urlsplit(url).hostname:
            names.add(host.lower())
    return frozenset(names)


class CheckHost:
    """Refuses (400, 40001) a request whose Host header names no address of this service."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self._allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._allowed:
            await self.app(scope, receive, send)
            return
        host = host_of(_header(scope, b"host"))
        if host is None or not (host in self._allowed or is_loopback(host)):
            await _refuse(
                send,
                400,
                f"the Host header {_header(scope, b'host')[:100]!r} names no address of this "
                "service (--allowed-hosts adds names)",
                ErrorCode.VALIDATION_TYPE_ERROR,
            )
            return
        await self.app(scope, receive, send)
