"""One way to run a service's HTTP server: uvicorn, guarded against slow and numerous clients.

uvicorn waits forever for a request head (its keep-alive timeout runs only between requests)
and for a request body that stops arriving, and its `limit_concurrency` answers 503 only once
a request has been parsed, so 1,000 clients trickling their heads hold 1,000 descriptors for
as long as they like. Each connection here is held to:

- a header timeout: the request head complete within `header_timeout_s` of its first byte (or
  of the connection, for the first request), however slowly it trickles; else 408 and closed;
- a body timeout: no more than `body_timeout_s` without a byte of a request body the service
  is waiting for; else 408 (or, once an answer has begun, just closed);
- a connection limit: beyond `max_connections` open ones, a new connection gets a canned 503
  and is closed at once, without being read;

and the limit is kept below the process' file limit, so that accepting never fails with "Too
many open files" (which asyncio retries once a second, logging each time).

The guard wraps the protocol class uvicorn would choose itself (httptools where it is
installed, else h11) and uses only what both share: the current request's `cycle`, the
transport, and the server's set of open connections.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
from dataclasses import dataclass, replace
from typing import Any, Protocol

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

logger = logging.getLogger(__name__)

# Descriptors the process needs besides its inbound connections (log, libraries, checkpoint
# files, its own clients' connection pools).
FD_RESERVE = 128
# A refused or timed-out client that does not read its answer is cut off after this long.
CLOSE_GRACE_S = 1.0


@dataclass(frozen=True)
class HttpLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1024


class _LimitSettings(Protocol):
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int


def limits_of(settings: _LimitSettings) -> HttpLimits:
    return HttpLimits(settings.header_timeout_s, settings.body_timeout_s, settings.max_connections)


def add_http_limit_arguments(
    parser: argparse.ArgumentParser, max_connections: int, max_request_mib: int
) -> None:
    """The flags of `HttpLimits` and of the body limits; their defaults are None, so only flags
    given override the service's settings (and its environment)."""
    add = parser.add_argument
    add(
        "--max-request-bytes",
        type=int,
        help=f"largest request body read (default {max_request_mib} MiB); larger ones get 413",
    )
    add(
        "--max-text-request-bytes",
        type=int,
        help="largest body of a request without pictures (default 4 MiB); larger ones get 413",
    )
    add(
        "--header-timeout-s",
        type=float,
        help="seconds a request head may take to arrive whole (default 10); then 408 and closed",
    )
    add(
        "--body-timeout-s",
        type=float,
        help="longest pause in a request body (default 30); then 408 and closed",
    )
    add(
        "--max-connections",
        type=int,
        help=f"open connections at once (default {max_connections}, lowered to fit the file "
        "limit); beyond it a new connection gets 503 unread",
    )


def _canned(status: str, text: str, *headers: str) -> bytes:
    body = text.encode()
    head = [
        f"HTTP/1.1 {status}",
        "content-type: text/plain; charset=utf-8",
        f"content-length: {len(body)}",
        "connection: close",
        *headers,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


TOO_MANY_CONNECTIONS = _canned(
    "503 Service Unavailable", "too many open connections; try again shortly", "retry-after: 1"
)
HEAD_TIMEOUT = _canned("408 Request Timeout", "the request head took too long to arrive")
BODY_TIMEOUT = _canned("408 Request Timeout", "the request body stopped arriving")


class _SlowClientGuard:
    """Mixed in before uvicorn's HTTP protocol class (see `guarded_protocol`)."""

    limits: HttpLimits
    # What the uvicorn protocol classes provide.
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    connections: set[Any]
    cycle: Any
    flow: Any
    client: tuple[str, int] | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._answered_and_closing = False  # a 408 sent: what still arrives is dropped
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = False  # has a byte of the awaited head arrived?
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_progress_at = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.connections) >= self.limits.max_connections:
            self._refused = True
            logger.warning(
                "refused a connection: the open-connection limit is reached",
                extra={"max_connections": self.limits.max_connections},
            )
            assert isinstance(transport, asyncio.Transport)
            _answer_and_close(transport, TOO_MANY_CONNECTIONS)
            return
        super().connection_made(transport)  # type: ignore[misc]
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._refused or self._answered_and_closing:
            return
        if self._between_requests():
            self._await_head()
            self._head_bytes = True
        cycle = self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not cycle:  # a new request head was parsed
            self._cancel_head_timer()
            self._head_bytes = False
        if self._body_awaited():
            self._body_progress_at = self.loop.time()
            if self._body_timer is None:
                self._arm_body_timer(self.limits.body_timeout_s)
        else:
            self._cancel_body_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def _still_ours(self) -> bool:
        """Open, and not handed over to another protocol (a WebSocket upgrade)."""
        return (
            not self._answered_and_closing
            and not self.transport.is_closing()
            and self.transport.get_protocol() is self
        )

    def _close_with(self, answer: bytes) -> None:
        self._answered_and_closing = True
        self._cancel_head_timer()
        self._cancel_body_timer()
        _answer_and_close(self.transport, answer)

    # Request head

    def _between_requests(self) -> bool:
        return self.cycle is None or bool(self.cycle.response_complete)

    def _await_head(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._on_head_timeout
            )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if not self._still_ours() or not self._between_requests():
            return
        if self.cycle is not None and self.cycle.more_body:
            # The rest of a body the application answered without reading: nothing to say.
            self._close_with(b"")
        elif self._head_bytes:
            logger.warning(
                "closed a connection: the request head was not complete in time",
                extra={"client": _address(self.client), "timeout_s": self.limits.header_timeout_s},
            )
            self._close_with(HEAD_TIMEOUT)
        else:  # connected, never asked anything (a browser's spare connection, a scanner)
            self._close_with(b"")

    # Request body

    def _body_awaited(self) -> bool:
        cycle = self.cycle
        return cycle is not None and bool(cycle.more_body) and not cycle.response_complete

    def _arm_body_timer(self, delay_s: float) -> None:
        self._body_timer = self.loop.call_later(delay_s, self._on_body_timer)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _on_body_timer(self) -> None:
        # One timer per connection, moved on lazily: a large upload's many chunks only
        # update a timestamp.
        self._body_timer = None
        if not self._still_ours() or not self._body_awaited():
            return
        now = self.loop.time()
        if self.flow.read_paused or self.cycle.waiting_for_100_continue:
            # The application has not taken what arrived, or not asked for the body yet (the
            # client waits for "100 Continue"): the wait is not the client's.
            self._body_progress_at = now
        idle_s = now - self._body_progress_at
        if idle_s < self.limits.body_timeout_s:
            self._arm_body_timer(self.limits.body_timeout_s - idle_s)
            return
        logger.warning(
            "closed a connection: the request body stopped arriving",
            extra={"client": _address(self.client), "timeout_s": self.limits.body_timeout_s},
        )
        answered = bool(self.cycle.response_started)
        self._close_with(b"" if answered else BODY_TIMEOUT)


def _address(client: tuple[str, int] | None) -> str | None:
    return f"{client[0]}:{client[1]}" if client else None


def _answer_and_close(transport: asyncio.Transport, answer: bytes) -> None:
    if answer:
        transport.write(answer)
    if transport.can_write_eof():
        # Half-close: the client reads the answer and then the end; what it still sends is
        # read and dropped. Closing at once with unread input would send it a reset instead
        # (the kernel's rule), and it would never see the 503 / 408.
        transport.write_eof()
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, transport.close)
    else:
        transport.close()  # after the answer is flushed
    # A client that neither reads nor closes is cut off.
    asyncio.get_running_loop().call_later(2 * CLOSE_GRACE_S, transport.abort)


def guarded_protocol(
    limits: HttpLimits, base: type[asyncio.Protocol] = AutoHTTPProtocol
) -> type[asyncio.Protocol]:
    """`base` (uvicorn's own choice by default) held to `limits`; a class per server, since
    uvicorn builds the protocol from its config and server state only."""
    return type(f"Guarded{base.__name__}", (_SlowClientGuard, base), {"limits": limits})


# Descriptors per allowed connection: the connection; one of the service's own per inbound
# one (the controller relays streams, the API calls workers); one for the listen backlog,
# which is as long as the limit: asyncio accepts a backlog's worth of connections in one turn
# of the loop, before any of them can be refused; and one for the previous turn's refused
# connections, whose close completes a turn later. With three, a fresh-clone CI run saw
# "Too many open files" at accept under a file limit of 256 and 300 trickling connections.
FDS_PER_CONNECTION = 4
MAX_BACKLOG = 2048  # uvicorn's default


def fit_to_file_limit(limits: HttpLimits, reserve: int = FD_RESERVE) -> HttpLimits:
    """`limits` with a connection limit the process' file limit can hold: the soft limit is
    raised (up to the hard one) where needed, else the connection limit is lowered."""
    needed = FDS_PER_CONNECTION * limits.max_connections + reserve
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return limits
    fitted = max(1, (soft - reserve) // FDS_PER_CONNECTION)
    logger.warning(
        "fewer connections than asked: the file limit is too low for them",
        extra={"max_connections": fitted, "asked": limits.max_connections, "nofile": soft},
    )
    return replace(limits, max_connections=fitted)


def http_server_config(
    app: Any, host: str, port: int, limits: HttpLimits, **options: Any
) -> uvicorn.Config:
    """A uvicorn.Config for `app`, its connections guarded by `limits` (fitted to the file
    limit); `options` are further uvicorn.Config arguments."""
    fitted = fit_to_file_limit(limits)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(fitted),
        backlog=min(fitted.max_connections, MAX_BACKLOG),
        log_config=None,
        **options,
    )


def run_http_server(app: Any, host: str, port: int, limits: HttpLimits, **options: Any) -> None:
    uvicorn.Server(http_server_config(app, host, port, limits, **options)).run()
