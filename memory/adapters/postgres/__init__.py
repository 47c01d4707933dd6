"""The PostgreSQL + pgvector storage family: store, vector index (HNSW), text index (tsvector +
GIN, BM25) and outbox on one database, sharing one transaction per thread.

Needs the `postgres` extra (`pip install 'headroom-memory[postgres]'`): psycopg 3 with its pool
and the `pgvector` package. `open_postgres(url, dimension)` builds the whole family;
`PgNotifyCache(family.db)` is the cache for replicas sharing the database.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache import PgNotifyCache
from .connection import PgDatabase, is_postgres_url, redact_url
from .outbox import PostgresOutbox
from .schema import ensure_vector_table, migrate, open_database
from .store import PostgresMemoryStore
from .text import PgTextIndex, fold_diacritics
from .vectors import PgVectorIndex, graph_name

__all__ = [
    "PgDatabase",
    "PgNotifyCache",
    "PgTextIndex",
    "PgVectorIndex",
    "PostgresFamily",
    "PostgresMemoryStore",
    "PostgresOutbox",
    "ensure_vector_table",
    "fold_diacritics",
    "graph_name",
    "is_postgres_url",
    "migrate",
    "open_database",
    "open_postgres",
    "redact_url",
]


@dataclass
class PostgresFamily:
    """One database's adapters; `close()` closes the pool they share."""

    db: PgDatabase
    store: PostgresMemoryStore
    vectors: PgVectorIndex
    text: PgTextIndex
    outbox: PostgresOutbox

    def close(self) -> None:
        self.db.close()


def open_postgres(
    url: str, dimension: int, *, hnsw_m: int = 16, hnsw_ef_construction: int = 64,
    hnsw_ef_search: int = 40, pool_size: int = 16, stop_words: frozenset[str] = frozenset(),
) -> PostgresFamily:
    """Connect (migrating the schema under an advisory lock) and build every adapter."""
    db = open_database(url, pool_size=pool_size)
    try:
        store = PostgresMemoryStore(db)
        vectors = PgVectorIndex(
            db, dimension, hnsw_m=hnsw_m, hnsw_ef_construction=hnsw_ef_construction,
            hnsw_ef_search=hnsw_ef_search,
        )
        return PostgresFamily(db, store, vectors, PgTextIndex(db, stop_words), store.outbox)
    except BaseException:
        db.close()
        raise
