"""Which implementations the contract suites run over: one registry of factories per port.

Every contract test takes its implementation from a fixture parametrised over a registry, so a new
backend joins every suite with one entry. For a storage family (store and both indexes on one
database, sharing its transactions), write a factory and register it:

    def postgres_storage(request: pytest.FixtureRequest, dimension: int) -> Storage:
        url = request.getfixturevalue("postgres_url")  # e.g. a session fixture running pgserver
        ...
        return Storage(store, vectors, text, close=pool.close)

    STORAGE["postgres"] = postgres_storage  # in this module

A factory receives the requesting test's `request` (for `tmp_path` or session fixtures) and
returns a fresh, empty backend; `close` runs after the test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from headroom.memory.adapters import (
    FTS5TextIndex,
    LRUMemoryCache,
    SQLiteMemoryStore,
    SqliteVecIndex,
)
from headroom.memory.db import Database
from headroom.memory.embedders import CachedEmbedder
from headroom.memory.ports import Embedder, MemoryCache, MemoryStore, TextIndex, VectorIndex
from tests.fakes import (
    FakeDatabase,
    FakeEmbedder,
    FakeMemoryCache,
    FakeMemoryStore,
    FakeTextIndex,
    FakeVectorIndex,
)

# Small enough to write vectors by hand in the tests.
DIMENSION = 8


@dataclass
class Storage:
    """One storage family: the indexes' writes commit or roll back with `store.transaction()`."""

    store: MemoryStore
    vectors: VectorIndex
    text: TextIndex
    close: Callable[[], None] = lambda: None


StorageFactory = Callable[[pytest.FixtureRequest, int], Storage]
CacheFactory = Callable[[pytest.FixtureRequest, int], MemoryCache]
EmbedderFactory = Callable[[pytest.FixtureRequest], Embedder]


def sqlite_storage(request: pytest.FixtureRequest, dimension: int) -> Storage:
    """The embedded default, on a real file (WAL, one connection per thread)."""
    db = Database(request.getfixturevalue("tmp_path") / "contract.db")
    store = SQLiteMemoryStore(db)
    with db.transaction():
        vectors = SqliteVecIndex(db, dimension)
    return Storage(store, vectors, FTS5TextIndex(db), close=db.close)


def postgres_storage(request: pytest.FixtureRequest, dimension: int) -> Storage:
    """PostgreSQL + pgvector in a fresh schema of the session's server (tests/pg.py)."""
    from headroom.memory.adapters.postgres import open_postgres

    family = open_postgres(request.getfixturevalue("pg_schema_url"), dimension, pool_size=4)
    return Storage(family.store, family.vectors, family.text, close=family.close)


def fake_storage(request: pytest.FixtureRequest, dimension: int) -> Storage:
    db = FakeDatabase()
    return Storage(FakeMemoryStore(db), FakeVectorIndex(db, dimension), FakeTextIndex(db))


STORAGE: dict[str, StorageFactory] = {
    "sqlite": sqlite_storage,
    "fake": fake_storage,
    "postgres": postgres_storage,
}

CACHES: dict[str, CacheFactory] = {
    "lru": lambda request, max_size: LRUMemoryCache(max_size),
    "fake": lambda request, max_size: FakeMemoryCache(max_size),
}

EMBEDDERS: dict[str, EmbedderFactory] = {
    "fake": lambda request: FakeEmbedder(),
    "cached-fake": lambda request: CachedEmbedder(FakeEmbedder(), max_size=4),
    # The real MiniLM on both local runtimes, loaded once per session (tests/conftest.py).
    "onnx": lambda request: request.getfixturevalue("local_embedder"),
    "torch": lambda request: request.getfixturevalue("torch_embedder"),
}
