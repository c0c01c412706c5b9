"""A body checked piece by piece finds what a check over the whole body finds, wherever the
pieces split it, and keeps nothing of a body past the bound on JSON values."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vilaserve.entrypoints.shared.worker_protocol_http import BodyScan, parse_json


def scanned(body: bytes, cuts: list[int], max_values: int | None = None) -> BodyScan:
    scan = BodyScan(b'"images"', max_values)
    edges = [0, *sorted(c % (len(body) + 1) for c in cuts), len(body)]
    for start, end in itertools.pairwise(edges):
        scan.add(body[start:end])
    return scan


@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_a_picture_key_and_a_surrogate_escape_are_found_across_any_split(cuts: list[int]) -> None:
    body = b'{"prompt": "x \\ud800 y", "images": ["aGk="], "n": [1, 2, {"a": 3}]}'
    scan = scanned(body, cuts)
    assert scan.names_picture
    assert scan.surrogate_escape
    assert scan.separators == body.count(b",") + body.count(b"[") + body.count(b"{")
    assert bytes(scan.raw) == body
    with pytest.raises(ValueError, match="not valid Unicode"):
        parse_json(scan)


@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_a_body_without_them_is_not_said_to_hold_them(cuts: list[int]) -> None:
    body = b'{"prompt": "images \\u00e9 \\\\ud800", "image": "x"}'
    scan = scanned(body, cuts)
    assert not scan.names_picture  # (an escaped backslash before `ud800` may be taken for an
    # escape: the parsed strings are then searched, and hold no surrogate)
    assert parse_json(scan) == {"prompt": "images \u00e9 \\ud800", "image": "x"}


def test_past_the_value_bound_the_bytes_are_measured_not_kept() -> None:
    body = b'{"x": [' + b"{}," * 5_000 + b'{}], "images": []}'
    scan = scanned(body, list(range(1000, len(body), 1000)), max_values=1_000)
    assert scan.size == len(body)
    assert len(scan.raw) < 1_100
    assert scan.names_picture  # still seen after the bytes stopped being kept
    with pytest.raises(ValueError, match="JSON commas and brackets"):
        parse_json(scan)
