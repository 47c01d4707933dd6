"""Which implementations the contract suites run over: one registry of factories per port.

Every contract test takes its implementation from a fixture parametrised over a registry, so a new
backend joins every suite (and tests/contracts/test_engine_over_ports.py) with one entry. For a
storage family (a store and both indexes on one database, sharing its transactions), write a
factory like `postgres_storage` below and add it to `STORAGE`.

A factory receives the requesting test's `request` (for `tmp_path` or session fixtures such as a
database server) and returns a fresh, empty backend; `close` runs after the test.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
import respx

from headroom.memory.adapters import (
    FTS5TextIndex,
    LRUMemoryCache,
    SQLiteMemoryStore,
    SqliteVecIndex,
)
from headroom.memory.db import Database
from headroom.memory.embedders import (
    BatchingEmbedder,
    CachedEmbedder,
    OllamaEmbedder,
    OnnxEmbedder,
    OpenAIEmbedder,
)
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


def postgres_cache(request: pytest.FixtureRequest, max_size: int) -> MemoryCache:
    """The replicas' cache: LRU invalidated across processes by NOTIFY (a fresh schema)."""
    from headroom.memory.adapters.postgres import PgNotifyCache, open_database

    db = open_database(request.getfixturevalue("pg_schema_url"), pool_size=2)
    request.addfinalizer(db.close)
    return PgNotifyCache(db, max_size)


STORAGE: dict[str, StorageFactory] = {
    "sqlite": sqlite_storage,
    "fake": fake_storage,
    "postgres": postgres_storage,
}

CACHES: dict[str, CacheFactory] = {
    "lru": lambda request, max_size: LRUMemoryCache(max_size),
    "fake": lambda request, max_size: FakeMemoryCache(max_size),
    "postgres": postgres_cache,
}

def _served_vectors(texts: list[str]) -> list[list[float]]:
    """What the fake embedding servers answer: the fake's vectors, scaled so that the client's own
    normalisation is what makes them unit length."""
    return (FakeEmbedder(16).embed(texts) * 3.0).tolist()


def _mock_server(request: pytest.FixtureRequest) -> respx.MockRouter:
    router = respx.mock(assert_all_called=False)
    router.start()
    request.addfinalizer(router.stop)
    return router


def openai_over_http(request: pytest.FixtureRequest) -> Embedder:
    def reply(req: httpx.Request) -> httpx.Response:
        vectors = _served_vectors(json.loads(req.content)["input"])
        data = [{"index": i, "embedding": v} for i, v in enumerate(vectors)]
        return httpx.Response(200, json={"data": data[::-1]})  # the API does not promise order

    _mock_server(request).post("https://embeddings.test/v1/embeddings").mock(side_effect=reply)
    embedder = OpenAIEmbedder(
        "contract-model", api_key="sk-test", base_url="https://embeddings.test/v1", batch_size=2
    )
    request.addfinalizer(embedder.close)
    return embedder


def ollama_over_http(request: pytest.FixtureRequest) -> Embedder:
    def reply(req: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json={"embeddings": _served_vectors(json.loads(req.content)["input"])}
        )

    _mock_server(request).post("http://ollama.test:11434/api/embed").mock(side_effect=reply)
    embedder = OllamaEmbedder(
        "contract-model", base_url="http://ollama.test:11434", batch_size=2
    )
    request.addfinalizer(embedder.close)
    return embedder


@functools.cache
def _int8_embedder() -> Embedder:
    """Loaded once per session, like the float models' session fixtures."""
    embedder = OnnxEmbedder(quantized=True)
    embedder.load()
    return embedder


EMBEDDERS: dict[str, EmbedderFactory] = {
    "fake": lambda request: FakeEmbedder(),
    "cached-fake": lambda request: CachedEmbedder(FakeEmbedder(), max_size=4),
    "batching-fake": lambda request: BatchingEmbedder(FakeEmbedder(), max_batch=2),
    # The HTTP clients against a fake server (respx): batching, ordering, normalisation.
    "openai": openai_over_http,
    "ollama": ollama_over_http,
    # The real MiniLM on both local runtimes, loaded once per session (tests/conftest.py).
    "onnx": lambda request: request.getfixturevalue("local_embedder"),
    "torch": lambda request: request.getfixturevalue("torch_embedder"),
    # Queries' int8 copy (memory/embedders/quantize.py), made once in the user's cache.
    "onnx-int8": lambda request: _int8_embedder(),
}
