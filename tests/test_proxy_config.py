"""The proxy derives the engine's configuration in one place, and no MemoryConfig field is lost."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from headroom.memory.errors import ConfigError
from headroom.memory.models import EmbedderBackend, MemoryConfig
from headroom.proxy.config import ProxyConfig

# A value other than the default for every MemoryConfig field, valid for a SQLite file.
CHANGED: dict[str, Any] = {
    "embedder_backend": EmbedderBackend.OLLAMA,
    "embedder_model": "nomic-embed-text",
    "vector_dimension": 768,
    "openai_api_key": "sk-embedder",
    "openai_base_url": "http://127.0.0.1:9/v1",
    "ollama_base_url": "http://127.0.0.1:9",
    "cache_enabled": False,
    "cache_max_size": 7,
    "torch_threads": 2,
    "embedder_runtime": "torch",
    "embed_batch_size": 3,
    "query_embedding_cache_size": 5,
    "dedup_threshold": 0.9,
    "bubble_importance_threshold": None,
    "recall_preset": "common",
    "reader_threads": 2,
    "vector_chunk_size": 64,
    "outbox_max_attempts": 2,
    "memory_queue_max_ops": 11,
    "max_memories_per_user": 13,
    "max_new_users_per_minute": 17,
    "recall_importance_weight": 1.5,
    "recall_core_tokens": 0,
    "recall_core_min_importance": 0.7,
}
# Left at their defaults on purpose: SQLite refuses non-default HNSW settings (PostgreSQL only).
HNSW = {"hnsw_ef_construction", "hnsw_m", "hnsw_ef_search"}


def _through_the_proxy(db: Path, name: str, value: Any) -> MemoryConfig:
    proxy_fields = {f.name for f in dataclasses.fields(ProxyConfig)}
    if name in proxy_fields:
        return ProxyConfig(db_path=db, **{name: value}).memory_config()
    return ProxyConfig(db_path=db, memory_options={name: value}).memory_config()


def test_every_memory_config_field_reaches_the_engine(tmp_path: Path) -> None:
    names = {f.name for f in dataclasses.fields(MemoryConfig)} - {"db_path"} - HNSW
    # A new MemoryConfig field must get a changed value here, so this test covers it.
    assert names == set(CHANGED), sorted(names ^ set(CHANGED))
    for name, value in CHANGED.items():
        built = _through_the_proxy(tmp_path / "m.db", name, value)
        assert getattr(built, name) == value, name
    assert ProxyConfig(db_path=tmp_path / "m.db").memory_config().db_path == tmp_path / "m.db"


def test_hnsw_settings_reach_a_postgresql_engine() -> None:
    built = ProxyConfig(db_path="postgresql://u@127.0.0.1/db",
                        memory_options={"hnsw_m": 8, "hnsw_ef_search": 99}).memory_config()
    assert (built.hnsw_m, built.hnsw_ef_search) == (8, 99)


def test_unknown_or_doubled_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown memory option"):
        ProxyConfig(db_path=tmp_path / "m.db", memory_options={"top_kk": 3}).memory_config()
    with pytest.raises(ConfigError, match="on ProxyConfig itself"):
        ProxyConfig(db_path=tmp_path / "m.db",
                    memory_options={"recall_preset": "common"}).memory_config()
