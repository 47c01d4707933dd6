"""pgvector specifics the contract suite cannot see: the HNSW settings reach the index and the
search, and a large user's graph search still answers with their own nearest rows."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import psycopg
import pytest

from headroom.memory.adapters.postgres import (
    PgDatabase,
    PgVectorIndex,
    ensure_vector_table,
    open_database,
)
from headroom.memory.errors import ConfigError
from headroom.memory.models import MemoryCategory
from tests.pg import pg_database, pg_schema_url, pg_server  # noqa: F401 (fixtures)

DIMENSION = 16
FACT = MemoryCategory.FACT


@pytest.fixture
def db(pg_schema_url: str) -> Iterator[PgDatabase]:  # noqa: F811
    database = open_database(pg_schema_url, pool_size=4)
    try:
        yield database
    finally:
        database.close()


def unit_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, DIMENSION)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def fill(index: PgVectorIndex, db: PgDatabase, user: str, vectors: np.ndarray, start: int) -> None:
    with db.transaction():
        for offset, vector in enumerate(vectors):
            index.add(start + offset, user, "u", FACT, vector)


def test_hnsw_settings_build_the_index(db: PgDatabase) -> None:
    PgVectorIndex(db, DIMENSION, hnsw_m=8, hnsw_ef_construction=32, hnsw_ef_search=77)
    options = db.scalar(
        "SELECT reloptions FROM pg_class WHERE oid = to_regclass('memory_vectors_hnsw')"
    )
    method = db.scalar(
        "SELECT am.amname FROM pg_class c JOIN pg_am am ON am.oid = c.relam"
        " WHERE c.oid = to_regclass('memory_vectors_hnsw')"
    )
    assert method == "hnsw"
    assert sorted(options) == ["ef_construction=32", "m=8"]


def test_another_dimension_is_refused_with_a_fix(db: PgDatabase) -> None:
    PgVectorIndex(db, DIMENSION)
    ensure_vector_table(db, DIMENSION)  # the same dimension again is fine
    with pytest.raises(ConfigError, match="dimension 16, not 32"):
        PgVectorIndex(db, 32)


def test_a_large_users_graph_search_finds_their_own_nearest(db: PgDatabase) -> None:
    index = PgVectorIndex(db, DIMENSION, hnsw_ef_search=200, exact_below=50)
    mine, theirs = unit_rows(300, 1), unit_rows(300, 2)
    fill(index, db, "big", mine, 1)
    fill(index, db, "other", theirs, 1001)
    query = unit_rows(1, 3)[0]
    exact = sorted(range(300), key=lambda i: -float(mine[i] @ query))[:10]
    hits = index.search(query, "big", scope_keys=None, categories=None, k=10)
    assert [rid for rid, _ in hits] == [i + 1 for i in exact]
    assert [round(s, 5) for _, s in hits] == [round(float(mine[i] @ query), 5) for i in exact]


def test_a_small_share_of_the_table_still_gets_k_results(db: PgDatabase) -> None:
    """A user above `exact_below` whose rows are few next to others' would lose rows to the
    graph walk's post-filter; the exact plan answers instead."""
    index = PgVectorIndex(db, DIMENSION, hnsw_ef_search=10, exact_below=5)
    fill(index, db, "crowd", unit_rows(2000, 4), 1)
    few = unit_rows(8, 5)
    fill(index, db, "few", few, 5001)
    query = few[3]
    hits = index.search(query, "few", scope_keys=None, categories=None, k=8)
    assert sorted(rid for rid, _ in hits) == list(range(5001, 5009))
    assert hits[0][0] == 5004 and hits[0][1] == pytest.approx(1.0, abs=1e-5)


def test_ef_search_is_set_only_for_the_search_transaction(db: PgDatabase) -> None:
    index = PgVectorIndex(db, DIMENSION, hnsw_ef_search=123, exact_below=1)
    fill(index, db, "big", unit_rows(5, 6), 1)
    with db.transaction():
        index.search(unit_rows(1, 7)[0], "big", scope_keys=None, categories=None, k=3)
        inside = db.scalar("SELECT current_setting('hnsw.ef_search')")
    with psycopg.connect(db.url) as conn:
        conn.execute("SELECT '[1]'::vector")  # loads pgvector, which defines the setting
        default = conn.execute("SELECT current_setting('hnsw.ef_search')").fetchone()
    assert inside == "123"
    assert default == ("40",)
