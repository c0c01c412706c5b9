"""Which replica a conversation belongs to: the one that holds its first picture.

A worker keeps the projected features of recent pictures (its image cache) and the KV rows of
recent prompts (its prefix cache). Turn 2 of a conversation about a picture sends the same
picture again and a prompt that starts with turn 1's; on the replica that served turn 1 both are
found. The key is a digest of the first picture as sent (base64 or data URL), so it needs no
decoding; a request without pictures has no key and goes wherever the load says.

Replicas are ranked by rendezvous hashing (highest random weight): each replica's weight is a
hash of the key and its id. A replica that joins takes over only the keys it now weighs most
for, and one that leaves hands on only its own; the rest stay where their caches are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

# Enough to tell conversations apart; short enough to travel with every request.
_KEY_BYTES = 16


def affinity_key(payload: Mapping[str, Any]) -> str | None:
    """The conversation's key: a digest of the request's first picture, or None without one."""
    images = payload.get("images")
    if not isinstance(images, list) or not images or not isinstance(images[0], str):
        return None
    return hashlib.blake2b(images[0].encode(), digest_size=_KEY_BYTES).hexdigest()


def rendezvous_order(key: str, members: Iterable[T], member_id: Any = str) -> list[T]:
    """`members` from the most to the least preferred for `key` (`member_id`: a stable name
    for each one, the same in every process)."""

    def weight(member: T) -> bytes:
        name = f"{key}/{member_id(member)}".encode()
        return hashlib.blake2b(name, digest_size=8).digest()

    return sorted(members, key=weight, reverse=True)
