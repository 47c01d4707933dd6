"""An LRU of text -> vector in front of any embedder, for queries that repeat."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from ..ports import Embedder
from ._common import empty, text_list

__all__ = ["CachedEmbedder"]


class CachedEmbedder:
    """Implements `memory.ports.Embedder` by asking `inner` only for texts it has not seen lately.

    The same `model_id` as `inner`: the vectors are the inner model's. `max_size=0` caches nothing
    (every call is a miss), so the cache can be switched off without changing the wiring. The lock
    is not held while `inner` computes, so two threads missing the same text may both compute it.
    """

    def __init__(self, inner: Embedder, max_size: int = 1024) -> None:
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        self.inner = inner
        self.model_id = inner.model_id
        self.max_size = max_size
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CachedEmbedder({self.inner!r}, max_size={self.max_size})"

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def dimension(self) -> int:
        return self.inner.dimension

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._entries)}

    def lookup(self, text: str) -> np.ndarray | None:
        """`text`'s vector if it is cached (a hit), else None without counting a miss: a
        dict lookup under a short lock, fit for an event loop; `embed` then counts the miss."""
        with self._lock:
            vector = self._entries.get(text)
            if vector is not None:
                self._entries.move_to_end(text)
                self.hits += 1
                return vector.copy()  # the caller's own, as from `embed`
            return None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        items = text_list(texts)
        if not items:
            return empty(self.dimension)
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for text in items:
                vector = self._entries.get(text)
                if vector is not None:
                    self._entries.move_to_end(text)
                    found[text] = vector
                    self.hits += 1
                else:
                    self.misses += 1
        missing = list(dict.fromkeys(t for t in items if t not in found))
        if missing:
            computed = self.inner.embed(missing)
            with self._lock:
                for text, row in zip(missing, computed, strict=True):
                    # A copy, so a cached row does not keep the whole batch's array alive.
                    vector = np.array(row, dtype=np.float32)
                    found[text] = vector
                    if self.max_size:
                        self._entries[text] = vector
                        self._entries.move_to_end(text)
                while len(self._entries) > self.max_size:
                    self._entries.popitem(last=False)
        # np.stack copies: callers never hold the cached arrays, so cannot corrupt them.
        return np.stack([found[text] for text in items]).astype(np.float32, copy=False)
