"""Helpers every embedder shares: argument checks, L2 normalisation, upstream error text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

__all__ = ["HTTPEmbedder", "empty", "l2_normalise", "text_list", "upstream_message"]


def text_list(texts: Sequence[str]) -> list[str]:
    # A bare string is a Sequence[str] too; embedding it would silently embed each character.
    if isinstance(texts, str):
        raise TypeError("embed() takes a sequence of strings, not a single string")
    out = list(texts)
    for text in out:
        if not isinstance(text, str):
            raise TypeError(f"embed() takes strings, got {type(text).__name__}")
    return out


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """float32 rows of unit length; an all-zero row stays zero instead of becoming NaN."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))


def empty(dimension: int) -> np.ndarray:
    return np.zeros((0, dimension), dtype=np.float32)


def upstream_message(response: httpx.Response) -> str:
    """The message an OpenAI- or Ollama-style error body carries, else the start of the body."""
    try:
        body: Any = response.json()
    except ValueError:
        return response.text[:300].strip() or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
    return str(body)[:300]


class HTTPEmbedder:
    """What the HTTP embedders share: one pooled client, batching, a dimension learned from the
    first answer when the model's size is not known up front. Subclasses send one batch."""

    model_id: str
    batch_size: int
    _dimension: int | None

    def __init__(self, client: httpx.Client) -> None:
        self._client = client

    def __enter__(self) -> HTTPEmbedder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    @property
    def known_dimension(self) -> int | None:
        return self._dimension

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            # An unknown model says its size only by answering: ask once with a short probe.
            self.embed(["dimension probe"])
        assert self._dimension is not None
        return self._dimension

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        items = text_list(texts)
        if not items:
            return empty(self.dimension)
        parts = [
            self._request(items[start : start + self.batch_size])
            for start in range(0, len(items), self.batch_size)
        ]
        return l2_normalise(np.concatenate(parts))

    def _request(self, batch: list[str]) -> np.ndarray:
        raise NotImplementedError
