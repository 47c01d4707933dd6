"""The proxy's settings: one frozen object built by the CLI (flags or HEADROOM_* variables)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..memory.errors import ConfigError
from ..memory.models import EmbedderBackend, MemoryConfig, default_db_path
from .policy import DEFAULT_UPSTREAM_ROUTES

__all__ = ["ProxyConfig"]


@dataclass(frozen=True)
class ProxyConfig:
    host: str = "127.0.0.1"
    port: int = 8787
    upstream_url: str = "https://api.openai.com"
    # The operator's upstream key: sent only with authenticated requests (proxy.auth), on the
    # upstream route allowlist. Never printed (repr=False).
    upstream_key: str | None = field(default=None, repr=False)
    db_path: str | Path = field(default_factory=default_db_path)
    embedder_backend: EmbedderBackend = EmbedderBackend.LOCAL
    embedder_model: str | None = None
    openai_api_key: str | None = field(default=None, repr=False)  # the embedder's; a secret
    ollama_base_url: str = "http://localhost:11434"
    torch_threads: int = 1
    embedder_runtime: str = "auto"
    top_k: int = 5
    token_budget: int = 800
    recall_preset: str = "default"  # a name from headroom.memory.recall.PRESETS
    # Every other MemoryConfig field, by name (e.g. {"max_memories_per_user": 5000}): the engine's
    # whole configuration reaches it, none silently dropped (see memory_config).
    memory_options: Mapping[str, Any] = field(default_factory=dict)
    log_level: str = "info"
    # Memory work must never hold a request up for long: past this, recall is skipped (fail open).
    recall_timeout_s: float = 2.0
    # Upstream timeouts (HEADROOM_UPSTREAM_{CONNECT,READ,TOTAL}_TIMEOUT): read is the longest
    # silence between two pieces of an answer (a model may think for minutes before its first
    # token); total bounds the whole exchange, 0 = no bound.
    upstream_connect_timeout_s: float = 10.0
    upstream_read_timeout_s: float = 600.0
    upstream_total_timeout_s: float = 0.0
    # What sends to the upstream (HEADROOM_UPSTREAM_TRANSPORT): "http1", the proxy's lean
    # HTTP/1.1 client (proxy.http1), or "httpx", httpx's own transport (httpcore).
    upstream_transport: str = field(
        default_factory=lambda: os.environ.get("HEADROOM_UPSTREAM_TRANSPORT", "http1")
    )
    # A client that stalls holds a connection: the longest wait for the rest of the request line
    # and headers (HEADROOM_HEADER_READ_TIMEOUT), and between two pieces of a body
    # (HEADROOM_BODY_READ_TIMEOUT, then a 408).
    header_read_timeout_s: float = 10.0
    body_read_timeout_s: float = 30.0
    # How long an idle client connection stays open for its next request
    # (HEADROOM_KEEP_ALIVE_TIMEOUT). Longer than the clients' own keep-alive expiry (5 s in the
    # OpenAI and Anthropic SDKs, httpx's default): a server that closes at that same moment
    # races the client's reuse of the connection, and the request sent as it closes fails
    # (uvicorn's 5 s default: a ReadError in 3 of 4 runs of bench/proxy_overhead.py at c=64).
    keep_alive_timeout_s: float = 65.0
    max_body_bytes: int = 32 * 1024 * 1024
    drain_timeout_s: float = 25.0
    # How long an answer's last byte waits for its memory ops to commit to the outbox; past it
    # the answer goes out anyway and the ops stay queued in memory for retry (fail open).
    durable_wait_s: float = 1.0
    # Proxy processes serving the one port (HEADROOM_WORKERS), each with its own engine and model
    # (proxy.workers); they share the database, whose write path is safe for several processes.
    workers: int = 1

    # Tenants and keys (proxy.auth): `auto` requires proxy keys on a non-loopback bind or when an
    # upstream key is set; `off` there also needs allow_unauthenticated (logged loudly).
    auth: str = "auto"
    allow_unauthenticated: bool = False
    key_db_path: str | Path | None = None  # default: next to db_path (memory.keys.db)
    cors_origins: tuple[str, ...] = ()  # web origins allowed to call the proxy (exact)
    upstream_routes: tuple[str, ...] = DEFAULT_UPSTREAM_ROUTES  # "METHOD /v1/path", `*` segment
    tenant_upstream_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    key_requests_per_minute: int | None = None  # per key, unless the key sets its own
    key_memories_per_minute: int | None = None

    # Anthropic's Messages API (`POST /v1/messages`) goes here when set, else to upstream_url
    # (an Anthropic-compatible gateway that serves every API). Same /v1 rule as upstream_url.
    anthropic_upstream_url: str | None = None
    # Path prefixes rewritten before anything else looks at the path (SDKs with other roots:
    # Groq's calls /openai/v1/...): (alias prefix, served prefix) pairs.
    path_aliases: tuple[tuple[str, str], ...] = (("/openai/v1/", "/v1/"),)

    def memory_config(self) -> MemoryConfig:
        """The engine's configuration: every field this config shares with MemoryConfig by name,
        then `memory_options` for the rest. The one place the proxy derives it."""
        engine_fields = {f.name for f in fields(MemoryConfig)}
        unknown = sorted(set(self.memory_options) - engine_fields)
        if unknown:
            raise ConfigError(f"unknown memory option(s) {', '.join(unknown)}; MemoryConfig has "
                              f"{', '.join(sorted(engine_fields))}")
        shared = {f.name: getattr(self, f.name) for f in fields(self) if f.name in engine_fields}
        clashes = sorted(set(shared) & set(self.memory_options))
        if clashes:
            raise ConfigError(f"set {', '.join(clashes)} on ProxyConfig itself, not in "
                              "memory_options")
        return MemoryConfig(**shared, **self.memory_options)

    @property
    def upstream_base(self) -> str:
        """The upstream root without a trailing /v1 or slash; client paths start with /v1."""
        url = self.upstream_url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url
