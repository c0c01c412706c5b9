"""The worker protocol's HTTP pieces, shared by the worker's and the controller's routes.

Both services read JSON request bodies the same way (an empty, oversized, too deeply nested or
malformed body is an `InvalidRequest` naming the problem, with the HTTP status it deserves) and
write generation streams the same way: one JSON object per frame, each followed by `b"\\0"`
(FastChat / LLaVA / TinyChat framing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Mapping
from json.encoder import encode_basestring
from typing import Any, TypeVar

from fastapi import Request

from vilaserve.domain.shared.errors import ErrorCode, InvalidRequest
from vilaserve.domain.shared.worker_gateway import FRAME_SEPARATOR

FRAME_MEDIA_TYPE = "application/octet-stream"
# A worker request carries its images inline (base64): 16 images of the default 20 MB limit
# would not fit, but a body this size already holds more pixels than any model reads.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
_DRAIN_LIMIT = 256 * 1024 * 1024
T = TypeVar("T")

# A body's commas and brackets bound how many values parsing it creates: each costs 50-70 bytes
# of memory for 2-3 bytes on the wire, so `[{}, {}, ...]` of 64 MB became 1.6 GB. Counted over
# each piece of the raw bytes as it arrives (strings included; C-speed), before parsing. Base64
# pictures hold none of these characters; a prompt would need megabytes of commas to get near.
DEFAULT_MAX_JSON_VALUES = 1_000_000
# A `\\uD800`-`\\uDFFF` escape: the only way a JSON text can carry an unpaired surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class BodyRefused(InvalidRequest):
    """A body refused for its size or type: answered with `http_status`, not a plain 400."""

    def __init__(self, message: str, http_status: int) -> None:
        super().__init__(message)
        self.http_status = http_status


def http_status_of(error: InvalidRequest | Exception, default: int) -> int:
    return int(getattr(error, "http_status", default))


def encode_frame(frame: Mapping[str, Any]) -> bytes:
    return json.dumps(frame, ensure_ascii=False).encode() + FRAME_SEPARATOR


class FrameEncoder:
    """Encodes one stream's frames, byte for byte as `encode_frame` does, without escaping
    again the cumulative `text` already sent: it keeps the escaped text of the last frame and,
    when the next frame's text extends it (the usual case: one token more), escapes only the
    new tail (JSON string escaping maps each character on its own, so the pieces join). Any
    other frame (text that does not extend, an error's message, `text` not the first key) is
    encoded in full."""

    def __init__(self) -> None:
        self._text = ""
        self._escaped = bytearray()  # `self._text` escaped, without its quotes, UTF-8

    def encode(self, frame: Mapping[str, Any]) -> bytes:
        text = frame.get("text") if type(frame) is dict else None
        if not isinstance(text, str) or next(iter(frame)) != "text":
            self._text, self._escaped = "", bytearray()
            return encode_frame(frame)
        if text.startswith(self._text):
            self._escaped += _escaped(text[len(self._text) :])
        else:
            self._escaped = bytearray(_escaped(text))
        self._text = text
        rest = json.dumps({k: v for k, v in frame.items() if k != "text"}, ensure_ascii=False)
        rest = rest[1:] if rest == "{}" else ", " + rest[1:]  # the `}` only, or `, ...}`
        return b"".join((b'{"text": "', self._escaped, b'"', rest.encode(), FRAME_SEPARATOR))


def _escaped(text: str) -> bytes:
    """`text` as the JSON string `json.dumps(..., ensure_ascii=False)` writes, less its quotes."""
    return encode_basestring(text)[1:-1].encode()


async def encode_frames(frames: AsyncIterator[Mapping[str, Any]]) -> AsyncIterator[bytes]:
    """One stream's frames (one request's), each encoded as `encode_frame` does."""
    encoder = FrameEncoder()
    async for frame in frames:
        yield encoder.encode(frame)


async def read_json(
    request: Request,
    limit: int = DEFAULT_MAX_BODY_BYTES,
    json_only: bool = False,
    text_limit: int | None = None,
) -> Any:
    """The body as JSON. `json_only`: refuse other content types (415), so that a web page on
    the same host cannot post here (browsers send text/plain or form types without asking).
    `text_limit`: the largest body of a request without `images` (413 beyond): only pictures
    need the full `limit`."""
    if json_only:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise BodyRefused(
                f"the body must be sent as Content-Type: application/json, not {kind or 'none'}",
                415,
            )
    try:
        scan = await read_bounded(request, limit, b'"images"', text_limit=text_limit)
        body = parse_json(scan)
        # `"images": []` names none
        refuse_text_only(scan, text_limit, isinstance(body, dict) and bool(body.get("images")))
    except BodyTooLarge as exc:
        raise BodyRefused(str(exc), 413) from exc
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    return body


class BodyTooLarge(Exception):
    """The body is over the service's limit (the rest of it was read and dropped)."""


def refuse_text_only(body: BodyScan, text_limit: int | None, names_picture: bool) -> None:
    """Raises `BodyTooLarge` for a body over `text_limit` that names no picture: only pictures
    need the full body limit."""
    if text_limit is None or body.size <= text_limit or names_picture:
        return
    raise BodyTooLarge(
        f"the request body is over {text_limit:,} bytes without any picture; that is the "
        "limit for a request without pictures"
    )


async def read_bounded(
    request: Request,
    limit: int,
    picture_key: bytes | None = None,
    max_values: int | None = DEFAULT_MAX_JSON_VALUES,
    text_limit: int | None = None,
) -> BodyScan:
    """The body, at most `limit` bytes (declared or not), and at most `text_limit` unless
    `picture_key` occurs within its first `text_limit` bytes (a request's text comes to far
    less: prompts are bounded by the context): `BodyTooLarge` beyond either, decided as soon
    as the bytes show it, the rest drained unread. Each piece is checked as it arrives (see
    `BodyScan`), so a 64 MB body costs the event loop many short turns, never one long one."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        await _drain(request)
        raise BodyTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    scan = BodyScan(picture_key, max_values)
    async for piece in request.stream():
        scan.add(piece)
        if scan.size > limit:
            await _drain(request)
            raise BodyTooLarge(f"the request body is larger than the limit of {limit} bytes")
        if text_limit is not None and scan.size > text_limit and not scan.names_picture:
            await _drain(request)
            refuse_text_only(scan, text_limit, names_picture=False)
    return scan


class BodyScan:
    """A body read piece by piece, with what the checks need counted on the way (C-speed
    searches over each piece, a few bytes of overlap for matches across pieces): its JSON
    commas and brackets, whether it names a picture, whether it holds a surrogate escape.
    Past `max_values` commas and brackets the body is refused: from there on it is only
    measured and searched for the picture key, not kept."""

    _OVERLAP = 16

    def __init__(self, picture_key: bytes | None = None, max_values: int | None = None) -> None:
        self.raw = bytearray()
        self.size = 0
        self.max_values = max_values
        self.separators = 0
        self.picture_key = picture_key
        self.names_picture = False
        self.surrogate_escape = False
        self._tail = b""

    def add(self, piece: bytes) -> None:
        self.size += len(piece)
        seam = self._tail + piece[: self._OVERLAP]
        self._tail = (self._tail + piece[-self._OVERLAP :])[-self._OVERLAP :]
        if self.picture_key is not None and not self.names_picture:
            self.names_picture = self.picture_key in piece or self.picture_key in seam
        if self.max_values is not None and self.separators > self.max_values:
            return  # refused already: nothing more is counted or kept
        self.separators += piece.count(b",") + piece.count(b"[") + piece.count(b"{")
        if not self.surrogate_escape:
            self.surrogate_escape = bool(
                _SURROGATE_ESCAPE.search(piece) or _SURROGATE_ESCAPE.search(seam)
            )
        if self.max_values is None or self.separators <= self.max_values:
            self.raw += piece
        else:
            self.raw = bytearray()


def parse_json(scan: BodyScan) -> Any:
    """A body read by `read_bounded` as JSON; ValueError naming the problem (empty, malformed,
    nested too deeply, too many values, NaN or Infinity, text that is not valid Unicode). The
    scan counted its bytes as they arrived: they are not searched again."""
    separators, max_values, text = scan.separators, scan.max_values, scan.raw
    if max_values is not None and separators > max_values:  # first: nothing of it was kept
        raise ValueError(_too_many_values(separators, max_values))
    if not text:
        raise ValueError("the request body is empty; a JSON object is expected")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"the request body is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise ValueError("the request body is nested too deeply to be read") from exc
    if scan.surrogate_escape and _has_lone_surrogate(value):
        # Python reads `"\\ud800"` into a str no encoder accepts: refused here, once, rather
        # than failing later in whichever service re-encodes it.
        raise ValueError(
            "the request body holds text that is not valid Unicode (an unpaired surrogate "
            "escape such as \\ud800)"
        )
    return value


def _too_many_values(separators: int, max_values: int) -> str:
    return (
        f"the request body holds {separators:,} JSON commas and brackets; at most "
        f"{max_values:,} are read"
    )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"the request body is not valid JSON ({name} is not a JSON number)")


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string (key or value) in a parsed body holds an unpaired surrogate."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


_SURROGATE = re.compile("[\\ud800-\\udfff]")


async def _drain(request: Request) -> None:
    """Reads and drops the rest of an oversized upload (up to a bound), so the client gets the
    refusal rather than a connection reset mid-upload."""
    seen = 0
    try:
        async for piece in request.stream():
            seen += len(piece)
            if seen > _DRAIN_LIMIT:
                return
    except Exception:  # a client that hangs up mid-upload: nothing left to drain
        return


def refusal_status(code: int, server_error: int) -> int:
    """The HTTP status of a refusal with FastChat `code`: 429 when busy, 400 for the client's
    own errors, `server_error` for ours."""
    if code == int(ErrorCode.ENGINE_OVERLOADED):
        return 429
    return 400 if code < 50000 else server_error


def refusal_headers(code: int) -> dict[str, str]:
    return {"Retry-After": "1"} if code == int(ErrorCode.ENGINE_OVERLOADED) else {}


async def prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    """`first`, then the rest of a stream whose first item was taken to decide the status."""
    yield first
    async with contextlib.aclosing(rest):  # type: ignore[type-var]
        async for item in rest:
            yield item


class ClientGone(Exception):
    """The client closed the connection while its request was being worked on."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it (and so the generation behind it) as soon as the client
    hangs up; raises `ClientGone` then. The body must already be read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # the client is gone anyway
            await task
        raise ClientGone()
    finally:
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
