"""Reads tool calls out of an answer as it streams (the worker sends text, token by token).

`ToolCallParser.feed` takes the answer's new text and returns what can be told so far: plain
text (`ContentPiece`), a call whose function name is known (`CallOpened`, with its new id), and
pieces of that call's arguments as the model writes them (`ArgumentsPiece`; joined, they are the
arguments' JSON text exactly as written). Text that may be the start of the calls (a partial
`<tool_call>`) is held back until it is told apart; `finish()` releases it.

Under the API's grammar an answer always follows its `ToolCallSyntax`. Without one (a worker that
ignores `structured_outputs`), an answer that breaks the syntax is text from where it breaks,
and all text when no call was opened yet: nothing the model wrote is lost.

The non-streaming answer is read by the same parser (`read_answer`), so both agree.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from vilaserve.domain.api.tool_syntax import ToolCallSyntax

WHITESPACE = " \t\r\n"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ContentPiece:
    text: str


@dataclass(frozen=True)
class CallOpened:
    index: int  # of the call within the answer
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsPiece:
    index: int
    text: str


ToolEvent = ContentPiece | CallOpened | ArgumentsPiece


# --- scanning the calls (pure: from the text of the calls so far) -------------------------


class _Incomplete(Exception):
    """The text ends where more is needed."""


class _Malformed(Exception):
    def __init__(self, at: int) -> None:
        super().__init__(at)
        self.at = at


@dataclass
class ScannedCall:
    name: str | None = None
    arguments_start: int | None = None
    arguments_end: int | None = None  # None while the arguments are still being written
    complete: bool = False

    def arguments(self, text: str, limit: int | None = None) -> str:
        """What was written of the arguments, up to `limit` (where the syntax broke)."""
        if self.arguments_start is None:
            return "{}" if self.complete else ""  # a call of no arguments
        return text[self.arguments_start : self.arguments_end or limit]


@dataclass
class Scan:
    calls: list[ScannedCall] = field(default_factory=list)
    malformed_at: int | None = None
    incomplete: bool = False


def scan_calls(
    text: str, syntax: ToolCallSyntax, known_names: Collection[str] | None = None
) -> Scan:
    """The calls in `text`, which starts where the calls start (at `syntax.opening`)."""
    scan = Scan()
    continuation = _pieces(syntax.separator + syntax.call_open)
    try:
        pos = _expect_pieces(text, 0, _pieces(syntax.calls_open + syntax.call_open))
        while True:
            call = ScannedCall()
            scan.calls.append(call)
            pos = _call_object(text, pos, call, syntax.arguments_key, known_names)
            pos = _expect_pieces(text, pos, _pieces(syntax.call_close))
            call.complete = True
            following = _match_pieces(text, pos, continuation) if continuation else None
            if following is not None:
                pos = following
                continue
            pos = _expect_pieces(text, pos, _pieces(syntax.calls_close))
            rest = _skip_whitespace(text, pos)
            if rest < len(text):
                raise _Malformed(rest)
            return scan
    except _Incomplete:
        scan.incomplete = True
    except _Malformed as exc:
        scan.malformed_at = exc.at
    return scan


def _pieces(canonical: str) -> tuple[str, ...]:
    return tuple(canonical.split())


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in WHITESPACE:
        pos += 1
    return pos


def _match_pieces(text: str, pos: int, pieces: tuple[str, ...]) -> int | None:
    """Past `pieces` (any whitespace around them); None when the text says otherwise."""
    for piece in pieces:
        pos = _skip_whitespace(text, pos)
        rest = text[pos : pos + len(piece)]
        if rest != piece[: len(rest)]:
            return None
        if len(rest) < len(piece):
            raise _Incomplete
        pos += len(piece)
    return pos


def _expect_pieces(text: str, pos: int, pieces: tuple[str, ...]) -> int:
    end = _match_pieces(text, pos, pieces)
    if end is None:
        raise _Malformed(_skip_whitespace(text, pos))
    return end


def _call_object(
    text: str,
    pos: int,
    call: ScannedCall,
    arguments_key: str,
    known_names: Collection[str] | None,
) -> int:
    start = pos = _skip_whitespace(text, pos)
    pos = _expect_char(text, pos, "{")
    first = True
    while True:
        pos = _skip_whitespace(text, pos)
        _need(text, pos)
        if first and text[pos] == "}":
            pos += 1
            break
        first = False
        key_end = _string_end(text, pos)
        key = json.loads(text[pos:key_end])
        pos = _expect_char(text, _skip_whitespace(text, key_end), ":")
        value = _skip_whitespace(text, pos)
        _need(text, value)
        if key == arguments_key:
            if text[value] != "{":
                raise _Malformed(value)
            call.arguments_start = value
        end = _value_end(text, value)
        if key == arguments_key:
            call.arguments_end = end
        elif key == "name":
            name = json.loads(text[value:end])
            if not isinstance(name, str) or (known_names is not None and name not in known_names):
                raise _Malformed(value)
            call.name = name
        pos = _skip_whitespace(text, end)
        _need(text, pos)
        if text[pos] == "}":
            pos += 1
            break
        pos = _expect_char(text, pos, ",")
    if call.name is None:
        raise _Malformed(start)
    return pos


def _need(text: str, pos: int) -> None:
    if pos >= len(text):
        raise _Incomplete


def _expect_char(text: str, pos: int, char: str) -> int:
    _need(text, pos)
    if text[pos] != char:
        raise _Malformed(pos)
    return pos + 1


def _string_end(text: str, pos: int) -> int:
    """The index after the JSON string that starts at `pos`."""
    _need(text, pos)
    if text[pos] != '"':
        raise _Malformed(pos)
    i = pos + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        i += 1
    raise _Incomplete


_CLOSERS = {"{": "}", "[": "]"}


def _value_end(text: str, pos: int) -> int:
    """The index after the JSON value that starts at `pos` (brackets matched, strings skipped;
    the grammar checked the rest)."""
    char = text[pos]
    if char == '"':
        return _string_end(text, pos)
    if char not in _CLOSERS:
        return _scalar_end(text, pos)
    expected = [_CLOSERS[char]]
    i = pos + 1
    while i < len(text):
        char = text[i]
        if char == '"':
            i = _string_end(text, i)
            continue
        if char in _CLOSERS:
            expected.append(_CLOSERS[char])
        elif char in "]}":
            if char != expected.pop():
                raise _Malformed(i)
            if not expected:
                return i + 1
        i += 1
    raise _Incomplete


def _scalar_end(text: str, pos: int) -> int:
    end = pos
    while end < len(text) and text[end] not in WHITESPACE + ",}]":
        end += 1
    if end == len(text):
        raise _Incomplete
    try:
        json.loads(text[pos:end])
    except ValueError:
        raise _Malformed(pos) from None
    return end


# --- the streaming parser -------------------------------------------------------------------


@dataclass
class _OpenedCall:
    sent: int = 0  # characters of its arguments sent so far


class ToolCallParser:
    def __init__(
        self,
        syntax: ToolCallSyntax,
        known_names: Collection[str] | None = None,
        call_id: Callable[[], str] = new_call_id,
    ) -> None:
        self._syntax = syntax
        self._known_names = known_names
        self._call_id = call_id
        self._text = ""
        self._sent = 0  # the text before this index went out as content (or is the calls')
        self._calls_at: int | None = None  # where the calls start, once seen
        self._text_only = False  # the answer is text from `_sent` on, whatever follows
        self._opened: list[_OpenedCall] = []

    @property
    def calls_made(self) -> int:
        return len(self._opened)

    def feed(self, text: str) -> list[ToolEvent]:
        self._text += text
        return self._advance(final=False)

    def finish(self) -> list[ToolEvent]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        if self._calls_at is None and not self._text_only:
            self._find_calls(events, final)
        if self._calls_at is not None and not self._text_only:
            self._read_calls(events, final)
        if self._text_only and self._sent < len(self._text):
            events.append(ContentPiece(self._text[self._sent :]))
            self._sent = len(self._text)
        return events

    def _find_calls(self, events: list[ToolEvent], final: bool) -> None:
        opening = self._syntax.opening.strip()
        if not self._syntax.text_before_calls:
            # The JSON syntaxes: a call is the whole answer, so its first character tells
            # (after any whitespace, which waits until it is told apart).
            first = _skip_whitespace(self._text, 0)
            if first < len(self._text):
                if self._text[first] == opening[0]:
                    self._calls_at = 0
                else:
                    self._text_only = True
            elif final and self._text:
                self._text_only = True
            return
        found = self._text.find(opening, self._sent)
        if found >= 0:
            self._content(events, found)
            self._calls_at = found
            return
        held = 0 if final else _partial_suffix(self._text, opening)
        self._content(events, len(self._text) - held)

    def _read_calls(self, events: list[ToolEvent], final: bool) -> None:
        assert self._calls_at is not None
        start = self._calls_at
        text = self._text[start:]
        scan = scan_calls(text, self._syntax, self._known_names)
        frontier = start  # the end of what the opened calls took of the text
        for index, call in enumerate(scan.calls):
            if index == len(self._opened):
                if call.name is None:
                    break
                self._opened.append(_OpenedCall())
                events.append(CallOpened(index, self._call_id(), call.name))
            opened = self._opened[index]
            arguments = call.arguments(text, scan.malformed_at)
            if len(arguments) > opened.sent:
                events.append(ArgumentsPiece(index, arguments[opened.sent :]))
                opened.sent = len(arguments)
            if call.arguments_start is not None:
                frontier = start + call.arguments_start + opened.sent
        if scan.malformed_at is not None or (final and scan.incomplete and not self._opened):
            # Text from where the syntax breaks; all of it when no call was opened.
            if self._opened and scan.malformed_at is not None:
                self._sent = max(start + scan.malformed_at, frontier)
            else:
                self._sent = start
            self._text_only = True
        elif final:
            self._sent = len(self._text)  # a call cut short (max_tokens) keeps what it has

    def _content(self, events: list[ToolEvent], upto: int) -> None:
        if upto > self._sent:
            events.append(ContentPiece(self._text[self._sent : upto]))
            self._sent = upto


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper start of `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


@dataclass(frozen=True)
class ReadCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ReadAnswer:
    content: str
    calls: tuple[ReadCall, ...]


def read_answer(
    text: str,
    syntax: ToolCallSyntax,
    known_names: Collection[str] | None = None,
    call_id: Callable[[], str] = new_call_id,
) -> ReadAnswer:
    """A whole answer: its text and its calls."""
    parser = ToolCallParser(syntax, known_names, call_id)
    return collect(parser.feed(text) + parser.finish())


def collect(events: list[ToolEvent]) -> ReadAnswer:
    content: list[str] = []
    calls: list[list[str]] = []
    for event in events:
        if isinstance(event, ContentPiece):
            content.append(event.text)
        elif isinstance(event, CallOpened):
            calls.append([event.id, event.name, ""])
        else:
            calls[event.index][2] += event.text
    return ReadAnswer("".join(content), tuple(ReadCall(*c) for c in calls))
