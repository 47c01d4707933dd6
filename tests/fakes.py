"""Fakes for our own ports, for fast unit tests of logic. The real adapters (MiniLM, sqlite-vec,
FTS5) still run in the contract tests and every end-to-end test."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"\w+")


class FakeEmbedder:
    """Deterministic bag-of-words hashing: texts sharing words are close. Counts its calls."""

    def __init__(self, dimension: int = 64, model_id: str = "fake:bow-64") -> None:
        self._dimension = dimension
        self.model_id = model_id
        self.calls: list[list[str]] = []
        self.fail_with: Exception | None = None

    @property
    def dimension(self) -> int:
        return self._dimension

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self._dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                h = int.from_bytes(hashlib.md5(word.encode()).digest()[:4], "little")
                out[i, h % self._dimension] += 1.0
            norm = np.linalg.norm(out[i])
            if norm == 0:
                out[i, 0] = 1.0
            else:
                out[i] /= norm
        return out
