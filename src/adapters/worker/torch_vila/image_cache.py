"""Projected image embeddings of recently seen images, so a picture is encoded once.

A multi-turn chat about one picture sends the same image bytes with every turn (the web chat,
the OpenAI API and TinyChat all resend the history); the tower and projector are the most
expensive part of such a turn's prefill. Entries are keyed by a hash of the image bytes and of
the worker's preprocessing (size, mean/std, aspect-ratio mode), bounded by the bytes they hold
(`--image-cache-mb`), least recently used evicted first.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from torch import Tensor


class ImageEmbeddingCache:
    def __init__(self, max_bytes: int, preprocessing: str) -> None:
        self.max_bytes = max_bytes
        self._salt = preprocessing.encode()
        self._entries: OrderedDict[str, Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # encode() runs on the event loop and worker threads
        self.hits = 0
        self.misses = 0

    def key(self, image: bytes) -> str:
        return hashlib.sha256(self._salt + b"\0" + image).hexdigest()

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> Tensor | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: str, embeddings: Tensor) -> None:
        """Keeps `embeddings` (one image's [tokens, hidden]); an entry larger than the whole
        cache is not kept."""
        size = embeddings.numel() * embeddings.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            while self._entries and self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()
            self._entries[key] = embeddings
            self._bytes += size
