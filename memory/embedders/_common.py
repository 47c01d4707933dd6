"""Helpers every embedder shares: argument checks, L2 normalisation, upstream error text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import httpx

__all__ = ["empty", "l2_normalise", "text_list", "upstream_message"]


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
