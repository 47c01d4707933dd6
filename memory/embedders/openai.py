"""Embeddings from OpenAI's (or any OpenAI-compatible server's) POST /embeddings endpoint."""

from __future__ import annotations

import os
import threading
from typing import Any

import httpx
import numpy as np

from ..errors import EmbedderError
from ._common import HTTPEmbedder, upstream_message

__all__ = ["OPENAI_DIMENSIONS", "OpenAIEmbedder"]

# Native sizes; text-embedding-3-* can also be asked for fewer with `dimensions`.
OPENAI_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


class OpenAIEmbedder(HTTPEmbedder):
    """Implements `memory.ports.Embedder` over HTTP with one pooled, thread-safe `httpx.Client`.

    Inputs are sent in batches of `batch_size`. The dimension is known up front for OpenAI's own
    models (or from `dimension`); for other models it is learned from the first response.
    """

    def __init__(
        self,
        model: str = "text-embedding-3-small",
        api_key: str | None = None,
        base_url: str = "https://api.openai.com/v1",
        dimension: int | None = None,
        timeout: float = 30.0,
        batch_size: int = 256,
    ) -> None:
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise EmbedderError(
                "the OpenAI embedder needs an API key: set OPENAI_API_KEY or pass "
                "openai_api_key in MemoryConfig"
            )
        if dimension is not None and dimension <= 0:
            raise ValueError("dimension must be positive")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/embeddings"
        self.timeout = timeout
        self.batch_size = batch_size
        self.requested_dimension = dimension
        # Shortened vectors are a different space from the full-size ones: name them apart.
        self.model_id = f"openai:{model}" if dimension is None else f"openai:{model}@{dimension}"
        self._dimension = dimension or OPENAI_DIMENSIONS.get(model)
        self._lock = threading.Lock()
        super().__init__(
            httpx.Client(
                headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(timeout)
            )
        )

    def __repr__(self) -> str:
        return f"OpenAIEmbedder({self.model!r}, base_url={self.base_url!r})"

    def _request(self, batch: list[str]) -> np.ndarray:
        # OpenAI rejects an empty string as input; a lone space embeds as "nothing" just as well.
        payload: dict[str, Any] = {"model": self.model, "input": [t or " " for t in batch]}
        if self.requested_dimension is not None:
            payload["dimensions"] = self.requested_dimension
        try:
            response = self._client.post(self.url, json=payload)
        except httpx.TimeoutException as exc:
            raise EmbedderError(
                f"OpenAI embeddings request to {self.url} timed out after {self.timeout:g}s"
            ) from exc
        except httpx.HTTPError as exc:
            raise EmbedderError(
                f"OpenAI embeddings request to {self.url} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if response.is_error:
            raise EmbedderError(
                f"OpenAI embeddings returned HTTP {response.status_code} for model "
                f"{self.model!r}: {upstream_message(response)}"
            )
        return self._parse(response, len(batch))

    def _parse(self, response: httpx.Response, expected: int) -> np.ndarray:
        try:
            data = response.json()["data"]
            # The API documents `index` as the input's position; order is not promised.
            rows = sorted(data, key=lambda item: int(item["index"]))
            vectors = np.asarray([row["embedding"] for row in rows], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbedderError(
                f"OpenAI embeddings returned an unexpected body ({type(exc).__name__}: {exc}): "
                f"{response.text[:200]!r}"
            ) from exc
        if vectors.ndim != 2 or vectors.shape[0] != expected:
            raise EmbedderError(
                f"OpenAI embeddings returned {vectors.shape[0] if vectors.ndim else 0} vectors "
                f"for {expected} inputs"
            )
        self._check_dimension(vectors.shape[1])
        return vectors

    def _check_dimension(self, dimension: int) -> None:
        with self._lock:
            if self._dimension is None:
                self._dimension = dimension
        if dimension != self._dimension:
            raise EmbedderError(
                f"OpenAI model {self.model!r} returned {dimension}-dimensional vectors, "
                f"expected {self._dimension}"
            )
