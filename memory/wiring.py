"""Wiring the defaults from a `MemoryConfig`: the SQLite file, the SQLite store and its outbox,
sqlite-vec vectors, FTS5 text, the configured embedder and the LRU cache; or, when `db_path` is a
`postgresql://` (or `postgres://`) URL, the PostgreSQL family (pgvector HNSW, tsvector text, its
outbox, and a cache that LISTEN/NOTIFY keeps true across replicas).

The database is opened on the thread that will be the engine's writer (SQLite connections belong
to the thread that opened them), and the embedder recorded in it is checked before anything is
written: vectors of two models never share an index.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from .adapters import FTS5TextIndex, LRUMemoryCache, SQLiteMemoryStore, SqliteVecIndex
from .db import Database
from .embedders import make_embedder
from .errors import ConfigError
from .models import MemoryConfig, is_database_url
from .parts import EngineParts
from .ports import Embedder, MemoryStore

__all__ = ["DefaultEngine", "open_defaults"]



@dataclass
class DefaultEngine:
    """What `open_defaults` built: the parts, the writer thread that opened the file, and what
    closes them."""

    parts: EngineParts
    writer: ThreadPoolExecutor
    close: Callable[[], None]


async def open_defaults(config: MemoryConfig, embedder: Embedder | None) -> DefaultEngine:
    """Open the file and build the default adapters. Pass `embedder` to share one loaded model
    between engines (the caller then owns it); otherwise the engine builds and closes its own."""
    writer = ThreadPoolExecutor(1, thread_name_prefix="headroom-writer")
    loop = asyncio.get_running_loop()
    try:
        db, parts = await loop.run_in_executor(writer, _build, config, embedder)
    except BaseException:
        writer.shutdown(wait=False)
        raise
    owned = embedder is None

    def close() -> None:
        db.close()
        closer = getattr(parts.embedder, "close", None)
        if owned and callable(closer):
            closer()

    return DefaultEngine(parts, writer, close)


class _Closable(Protocol):
    def close(self) -> None: ...


def _build(config: MemoryConfig, embedder: Embedder | None) -> tuple[_Closable, EngineParts]:
    if is_database_url(config.db_path):
        return _build_postgres(config, embedder)
    return _build_sqlite(config, embedder)


def _check_recorded_model(where: str, recorded_model: str | None, embedder: Embedder) -> None:
    if recorded_model is not None and recorded_model != embedder.model_id:
        raise ConfigError(
            f"{where} was built with embedder {recorded_model}, not "
            f"{embedder.model_id}: configure that embedder, or export the memories and "
            "import them into a new database (import re-embeds them)"
        )


def _embedder_and_dimension(
    config: MemoryConfig, store: MemoryStore, embedder: Embedder | None, where: str
) -> tuple[Embedder, int, bool]:
    """The embedder (made from the config unless given), the vector dimension (as recorded, else
    configured, else the embedder's) and whether the database records neither yet."""
    if embedder is None:
        embedder = make_embedder(config)
    recorded_model = store.get_setting("embedding_model")
    recorded_dim = store.get_setting("vector_dimension")
    _check_recorded_model(where, recorded_model, embedder)
    dimension = (
        int(recorded_dim) if recorded_dim else (config.vector_dimension or embedder.dimension)
    )
    return embedder, dimension, recorded_model is None or recorded_dim is None


def _record(store: MemoryStore, embedder: Embedder, dimension: int) -> None:
    store.set_setting("embedding_model", embedder.model_id)
    store.set_setting("vector_dimension", str(dimension))


def _build_sqlite(config: MemoryConfig, embedder: Embedder | None) -> tuple[Database, EngineParts]:
    db = Database(config.db_path)  # type: ignore[arg-type]
    try:
        store = SQLiteMemoryStore(db)
        embedder, dimension, first_open = _embedder_and_dimension(
            config, store, embedder, str(config.db_path)
        )
        if first_open:
            with db.transaction():  # first open of a new file: create the vector table
                vectors = SqliteVecIndex(db, dimension, config.vector_chunk_size)
                _record(store, embedder, dimension)
        else:  # later opens only read, so they never wait on another process's writes
            vectors = SqliteVecIndex(db, dimension)
        text = FTS5TextIndex(db)
        cache = LRUMemoryCache(config.cache_max_size) if config.cache_enabled else None
        return db, EngineParts(config, store, vectors, text, embedder, cache, store.outbox)
    except BaseException:
        db.close()
        raise


def _build_postgres(
    config: MemoryConfig, embedder: Embedder | None
) -> tuple[_Closable, EngineParts]:
    try:
        from .adapters.postgres import (
            PgNotifyCache,
            PgTextIndex,
            PgVectorIndex,
            PostgresMemoryStore,
            open_database,
            redact_url,
        )
    except ImportError as exc:
        raise ConfigError(
            "a postgresql:// database needs the postgres extra: "
            "pip install 'headroom-memory[postgres]'"
        ) from exc
    url = str(config.db_path)
    db = open_database(url)  # migrates under an advisory lock; StorageError on a bad URL
    try:
        store = PostgresMemoryStore(db)
        embedder, dimension, first_open = _embedder_and_dimension(
            config, store, embedder, redact_url(url)
        )
        vectors = PgVectorIndex(
            db,
            dimension,
            hnsw_m=config.hnsw_m,
            hnsw_ef_construction=config.hnsw_ef_construction,
            hnsw_ef_search=config.hnsw_ef_search,
        )
        if first_open:
            with db.transaction():
                _record(store, embedder, dimension)
        cache = PgNotifyCache(db, config.cache_max_size) if config.cache_enabled else None
        parts = EngineParts(config, store, vectors, PgTextIndex(db), embedder, cache, store.outbox)
        return db, parts
    except BaseException:
        db.close()
        raise
