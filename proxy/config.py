"""The proxy's settings: one frozen object built by the CLI (flags or HEADROOM_* variables)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..memory.models import EmbedderBackend, MemoryConfig, default_db_path

__all__ = ["ProxyConfig"]


@dataclass(frozen=True)
class ProxyConfig:
    host: str = "127.0.0.1"
    port: int = 8787
    upstream_url: str = "https://api.openai.com"
    # Used only when the client sends no Authorization header of its own.
    upstream_key: str | None = None
    db_path: str | Path = field(default_factory=default_db_path)
    embedder_backend: EmbedderBackend = EmbedderBackend.LOCAL
    embedder_model: str | None = None
    openai_api_key: str | None = None
    ollama_base_url: str = "http://localhost:11434"
    torch_threads: int = 1
    embedder_runtime: str = "auto"
    top_k: int = 5
    token_budget: int = 800
    log_level: str = "info"
    # Memory work must never hold a request up for long: past this, recall is skipped (fail open).
    recall_timeout_s: float = 2.0
    upstream_timeout_s: float = 600.0
    upstream_connect_timeout_s: float = 10.0
    max_body_bytes: int = 32 * 1024 * 1024
    drain_timeout_s: float = 25.0

    def memory_config(self) -> MemoryConfig:
        return MemoryConfig(
            db_path=self.db_path,
            embedder_backend=self.embedder_backend,
            embedder_model=self.embedder_model,
            openai_api_key=self.openai_api_key,
            ollama_base_url=self.ollama_base_url,
            torch_threads=self.torch_threads,
            embedder_runtime=self.embedder_runtime,
        )

    @property
    def upstream_base(self) -> str:
        """The upstream root without a trailing /v1 or slash; client paths start with /v1."""
        url = self.upstream_url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url
