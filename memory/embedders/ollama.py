"""Embeddings from a local Ollama server's POST /api/embed endpoint."""

from __future__ import annotations

import threading

import httpx
import numpy as np

from ..errors import EmbedderError
from ._common import HTTPEmbedder, upstream_message

__all__ = ["OLLAMA_DIMENSIONS", "OllamaEmbedder"]

# Only models whose default tag has one size; e.g. snowflake-arctic-embed's tags differ.
OLLAMA_DIMENSIONS = {
    "nomic-embed-text": 768,
    "mxbai-embed-large": 1024,
    "all-minilm": 384,
    "bge-m3": 1024,
}


def _untagged(model: str) -> str:
    """'nomic-embed-text:latest' and 'nomic-embed-text' name the same model."""
    return model.removesuffix(":latest")


class OllamaEmbedder(HTTPEmbedder):
    """Implements `memory.ports.Embedder` over Ollama's HTTP API (one pooled `httpx.Client`)."""

    def __init__(
        self,
        model: str = "nomic-embed-text",
        base_url: str = "http://localhost:11434",
        timeout: float = 60.0,
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/api/embed"
        self.timeout = timeout
        self.batch_size = batch_size
        self.model_id = f"ollama:{_untagged(model)}"
        self._dimension = OLLAMA_DIMENSIONS.get(_untagged(model))
        self._lock = threading.Lock()
        super().__init__(httpx.Client(timeout=httpx.Timeout(timeout)))

    def __repr__(self) -> str:
        return f"OllamaEmbedder({self.model!r}, base_url={self.base_url!r})"

    def _request(self, batch: list[str]) -> np.ndarray:
        try:
            response = self._client.post(self.url, json={"model": self.model, "input": batch})
        except httpx.ConnectError as exc:
            raise EmbedderError(
                f"could not connect to Ollama ({exc}): is Ollama running at {self.base_url}?"
            ) from exc
        except httpx.TimeoutException as exc:
            raise EmbedderError(
                f"Ollama embeddings request to {self.url} timed out after {self.timeout:g}s "
                "(the first request also loads the model)"
            ) from exc
        except httpx.HTTPError as exc:
            raise EmbedderError(
                f"Ollama embeddings request to {self.url} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if response.is_error:
            hint = f"; try `ollama pull {self.model}`" if response.status_code == 404 else ""
            raise EmbedderError(
                f"Ollama returned HTTP {response.status_code} for model {self.model!r}: "
                f"{upstream_message(response)}{hint}"
            )
        try:
            vectors = np.asarray(response.json()["embeddings"], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbedderError(
                f"Ollama returned an unexpected body ({type(exc).__name__}: {exc}): "
                f"{response.text[:200]!r}"
            ) from exc
        if vectors.ndim != 2 or vectors.shape[0] != len(batch):
            raise EmbedderError(
                f"Ollama returned {vectors.shape[0] if vectors.ndim else 0} vectors "
                f"for {len(batch)} inputs"
            )
        with self._lock:
            if self._dimension is None:
                self._dimension = int(vectors.shape[1])
        if vectors.shape[1] != self._dimension:
            raise EmbedderError(
                f"Ollama model {self.model!r} returned {vectors.shape[1]}-dimensional vectors, "
                f"expected {self._dimension}"
            )
        return vectors
