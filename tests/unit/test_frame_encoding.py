"""The per-stream frame encoder (issue 24): the bytes of `json.dumps(frame, ensure_ascii=False)
+ b"\\0"` for every frame, with the cumulative text escaped only once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vilaserve.entrypoints.shared import worker_protocol_http as protocol
from vilaserve.entrypoints.shared.worker_protocol_http import (
    FRAME_SEPARATOR,
    FrameEncoder,
    encode_frame,
    encode_frames,
)


def plain(frame: dict[str, Any]) -> bytes:
    """The encoding every frame must keep, byte for byte."""
    return json.dumps(frame, ensure_ascii=False).encode() + FRAME_SEPARATOR


# Characters JSON escapes or that are easy to get wrong: quotes, backslashes, every control
# character, DEL, the line and paragraph separators, non-ASCII from the BMP and beyond.
_tricky = st.sampled_from(
    ['"', "\\", "/", "\x7f", "\u2028", "\u2029", "é", "中", "😀", "\ufeff", "\U0010ffff"]
    + [chr(c) for c in range(0x20)]
)
_no_surrogates = st.characters(blacklist_categories=("Cs",))
_pieces = st.text(st.one_of(_tricky, _no_surrogates), max_size=12)

# Each step either extends the text (a token more, or none: a repeated final frame) or
# replaces it (an echo or prefix change, an error's message).
_steps = st.lists(st.tuples(st.sampled_from(["extend", "extend", "extend", "replace"]), _pieces))
_usage = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {
            "prompt_tokens": st.integers(0, 10_000),
            "completion_tokens": st.integers(0, 10_000),
            "total_tokens": st.integers(0, 20_000),
        }
    ),
)
_others = st.fixed_dictionaries(
    {
        "error_code": st.sampled_from([0, 0, 0, 40301, 50001]),
        "usage": _usage,
        "finish_reason": st.sampled_from([None, None, "stop", "length", 'a "reason"\n']),
    }
)


def _texts(steps: list[tuple[str, str]]) -> list[str]:
    texts, text = [], ""
    for op, piece in steps:
        text = text + piece if op == "extend" else piece
        texts.append(text)
    return texts


@given(_steps, st.lists(_others, min_size=1))
def test_a_stream_of_frames_is_encoded_as_json_dumps_would(
    steps: list[tuple[str, str]], others: list[dict[str, Any]]
) -> None:
    encoder = FrameEncoder()
    for i, text in enumerate(_texts(steps)):
        frame = {"text": text, **others[i % len(others)]}
        assert encoder.encode(frame) == plain(frame) == encode_frame(frame)


@given(_steps, st.data())
def test_frames_of_other_shapes_are_encoded_in_full_and_in_the_same_bytes(
    steps: list[tuple[str, str]], data: st.DataObject
) -> None:
    """Relayed frames need not be the worker's own: other keys, `text` elsewhere or missing,
    not a string, no other key at all. Each is still `json.dumps`'s bytes, and the stream's
    next frames too."""
    shapes = st.sampled_from(["plain", "text only", "text last", "no text", "text not str"])
    encoder = FrameEncoder()
    for text in _texts(steps):
        shape = data.draw(shapes)
        frame: dict[str, Any] = {
            "plain": {"text": text, "error_code": 0, "logprobs": None, "x": [1.5, "é"]},
            "text only": {"text": text},
            "text last": {"error_code": 0, "text": text},
            "no text": {"error_code": 0, "usage": None},
            "text not str": {"text": None, "error_code": 50001},
        }[shape]
        assert encoder.encode(frame) == plain(frame)


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ('say "hi"', rb"say \"hi\""),
        ("a\\b", rb"a\\b"),
        ("line\nnext\ttab\r\x08\x0c", rb"line\nnext\ttab\r\b\f"),
        ("\x00\x1f\x7f", rb"\u0000\u001f" + b"\x7f"),
        ("é中😀\u2028", "é中😀\u2028".encode()),
        ("a/b", b"a/b"),
    ],
)
def test_each_piece_of_text_is_escaped_as_json_requires(text: str, escaped: bytes) -> None:
    """Literal bytes, so that a wrong escaper fails here even if `json.dumps` changed too: the
    text arrives in two steps (escaped on its own, then only the tail) and in one."""
    expected = b'{"text": "' + escaped + b'", "error_code": 0}\0'
    stepwise = FrameEncoder()
    stepwise.encode({"text": text[:1], "error_code": 0})
    assert stepwise.encode({"text": text, "error_code": 0}) == expected
    assert FrameEncoder().encode({"text": text, "error_code": 0}) == expected
    assert json.loads(expected[:-1])["text"] == text


def test_only_the_new_tail_of_an_extending_text_is_escaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The point of the encoder: a 2,000-token answer escapes each character once, not once
    per frame; a text that does not extend the last one is escaped in full."""
    escaped: list[str] = []

    def spy(text: str) -> str:
        escaped.append(text)
        return json.encoder.py_encode_basestring(text)  # type: ignore[attr-defined]

    monkeypatch.setattr(protocol, "encode_basestring", spy)
    encoder = FrameEncoder()
    text = ""
    for i in range(2000):
        text += ["tok ", ' "a"', "\n\\x\t", "é中 😀"][i % 4]
        assert encoder.encode({"text": text, "error_code": 0}) == plain(
            {"text": text, "error_code": 0}
        )
    assert sum(map(len, escaped)) == len(text)
    escaped.clear()
    assert encoder.encode({"text": "an error", "error_code": 50001}) == plain(
        {"text": "an error", "error_code": 50001}
    )
    assert escaped == ["an error"]


def test_encode_frames_encodes_one_stream_as_encode_frame_does() -> None:
    frames = [
        {"text": "a", "error_code": 0, "usage": None, "finish_reason": None},
        {"text": 'a"b', "error_code": 0, "usage": None, "finish_reason": None},
        {"text": 'a"b\n', "error_code": 0, "usage": {"total_tokens": 3}, "finish_reason": "stop"},
    ]

    async def source() -> AsyncIterator[dict[str, Any]]:
        for frame in frames:
            yield frame

    async def collect() -> list[bytes]:
        return [piece async for piece in encode_frames(source())]

    assert asyncio.run(collect()) == [encode_frame(frame) for frame in frames]
