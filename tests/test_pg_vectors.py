"""pgvector specifics the contract suite cannot see: a large user gets an HNSW graph of their own
built with the configured settings, searched with `hnsw.ef_search`, answering with their own
nearest rows."""

from __future__ import annotations

import time

import numpy as np
import psycopg
import pytest

from headroom.memory.adapters.postgres import (
    PgDatabase,
    PgVectorIndex,
    ensure_vector_table,
    graph_name,
)
from headroom.memory.errors import ConfigError
from headroom.memory.models import MemoryCategory
from tests.pg import pg_database, pg_db, pg_schema_url, pg_server  # noqa: F401 (fixtures)

DIMENSION = 16
FACT = MemoryCategory.FACT


@pytest.fixture
def db(pg_db: PgDatabase) -> PgDatabase:  # noqa: F811
    return pg_db


def unit_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, DIMENSION)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def fill(index: PgVectorIndex, db: PgDatabase, user: str, vectors: np.ndarray, start: int) -> None:
    with db.transaction():
        for offset, vector in enumerate(vectors):
            index.add(start + offset, user, "u", FACT, vector)


def graph_options(db: PgDatabase, user: str) -> tuple[str, list[str], str] | None:
    """(access method, reloptions, predicate) of the user's graph, None without one."""
    row = db.fetchone(
        "SELECT am.amname, c.reloptions, pg_get_expr(i.indpred, i.indrelid)"
        " FROM pg_class c JOIN pg_am am ON am.oid = c.relam JOIN pg_index i ON i.indexrelid = c.oid"
        " WHERE c.oid = to_regclass(%s)",
        (graph_name(user),),
    )
    return None if row is None else (row[0], sorted(row[1]), row[2])


def test_a_large_user_gets_a_graph_built_with_the_hnsw_settings(db: PgDatabase) -> None:
    index = PgVectorIndex(db, DIMENSION, hnsw_m=8, hnsw_ef_construction=32, exact_below=20)
    fill(index, db, "o'big", unit_rows(25, 1), 1)
    fill(index, db, "small", unit_rows(5, 2), 101)
    assert index.build_graph("o'big") is True
    assert graph_options(db, "o'big") == (
        "hnsw", ["ef_construction=32", "m=8"], "(user_id = 'o''big'::text)"
    )
    assert graph_options(db, "small") is None
    assert index.has_graph("o'big") and not index.has_graph("small")
    assert index.build_graph("o'big") is True  # already there: nothing to redo


def test_the_first_search_of_a_large_user_builds_their_graph(db: PgDatabase) -> None:
    index = PgVectorIndex(db, DIMENSION, exact_below=20)
    mine = unit_rows(30, 3)
    fill(index, db, "big", mine, 1)
    query = mine[7]
    hits = index.search(query, "big", scope_keys=None, categories=None, k=3)
    assert hits[0][0] == 8  # answered exactly while the graph builds
    deadline = time.monotonic() + 60
    while not index.has_graph("big") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert index.has_graph("big")
    assert index.search(query, "big", scope_keys=None, categories=None, k=3)[0][0] == 8


def test_bad_hnsw_settings_are_refused(db: PgDatabase) -> None:
    with pytest.raises(ConfigError, match="hnsw_ef_construction at least twice hnsw_m"):
        PgVectorIndex(db, DIMENSION, hnsw_m=16, hnsw_ef_construction=20)


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
    assert index.build_graph("big")
    query = unit_rows(1, 3)[0]
    exact = sorted(range(300), key=lambda i: -float(mine[i] @ query))[:10]
    hits = index.search(query, "big", scope_keys=None, categories=None, k=10)
    assert [rid for rid, _ in hits] == [i + 1 for i in exact]
    assert [round(s, 5) for _, s in hits] == [round(float(mine[i] @ query), 5) for i in exact]


def test_the_graph_search_uses_the_users_own_graph(db: PgDatabase) -> None:
    index = PgVectorIndex(db, DIMENSION, exact_below=50)
    fill(index, db, "big", unit_rows(300, 4), 1)
    assert index.build_graph("big")
    with db.connection() as conn:
        conn.execute("ANALYZE memory_vectors")
        plan = conn.execute(
            "EXPLAIN SELECT rid FROM memory_vectors WHERE user_id = 'big'"
            " ORDER BY embedding <=> %s LIMIT 10",
            (unit_rows(1, 5)[0],),
        ).fetchall()
    assert graph_name("big") in " ".join(line for (line,) in plan)


def test_scope_filters_on_a_graph_still_get_k_results(db: PgDatabase) -> None:
    """The walk returns `ef_search` rows before scope filters them; when too few are left the
    exact plan answers instead."""
    index = PgVectorIndex(db, DIMENSION, hnsw_ef_search=10, exact_below=50)
    rows = unit_rows(400, 6)
    with db.transaction():
        for i, vector in enumerate(rows):
            index.add(i + 1, "big", "rare" if i % 50 == 0 else "u", FACT, vector)
    assert index.build_graph("big")
    hits = index.search(rows[0], "big", scope_keys=["rare"], categories=None, k=8)
    assert sorted(rid for rid, _ in hits) == [i + 1 for i in range(0, 400, 50)]
    assert hits[0] == (1, pytest.approx(1.0, abs=1e-5))


def test_ef_search_is_set_only_for_the_search_transaction(db: PgDatabase) -> None:
    index = PgVectorIndex(db, DIMENSION, hnsw_ef_search=123, exact_below=1)
    fill(index, db, "big", unit_rows(5, 7), 1)
    assert index.build_graph("big")
    with db.transaction():
        index.search(unit_rows(1, 8)[0], "big", scope_keys=None, categories=None, k=3)
        inside = db.scalar("SELECT current_setting('hnsw.ef_search')")
    with psycopg.connect(db.url) as conn:
        conn.execute("SELECT '[1]'::vector")  # loads pgvector, which defines the setting
        default = conn.execute("SELECT current_setting('hnsw.ef_search')").fetchone()
    assert inside == "123"
    assert default == ("40",)
