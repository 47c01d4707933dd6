"""The heavy tier of the SQLite vector index (issue 14): past `heavy_limit` vectors a user's
search is a scan of sign bits and an exact re-rank of the nearest few, with the same answers
as the exact search, the same pre-filters, and deletes, supersession and rollbacks honoured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from headroom.memory import migrations
from headroom.memory.adapters import FTS5TextIndex, SQLiteMemoryStore, SqliteVecIndex
from headroom.memory.adapters.fts5_index import user_token
from headroom.memory.adapters.heavy_vectors import HEAVY_LIMIT, HeavyVectors
from headroom.memory.db import Database
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import MemoryCategory, MemoryConfig
from tests.fakes import FakeEmbedder
from tests.index_files import unit

pytestmark = pytest.mark.sqlite_only("the heavy tier is the SQLite vector index's")

DIM = 256
FACT, PREF = MemoryCategory.FACT, MemoryCategory.PREFERENCE
USER, SESSION = "\x1f\x1f", "s1\x1f\x1f"


def _clustered(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """Vectors around topics sharing a common direction, as sentence embeddings are (MiniLM's
    have a mean far from zero), not isotropic noise."""
    topics = rng.standard_normal((40, dim)).astype(np.float32)
    common = np.abs(rng.standard_normal(dim)).astype(np.float32) * 2
    return unit(common + topics[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, dim)))


def _near(rng: np.random.Generator, vectors: np.ndarray, n: int) -> np.ndarray:
    """Queries about stored memories: a stored vector moved a little."""
    picked = vectors[rng.integers(0, len(vectors), n)]
    return unit(picked + 0.04 * rng.standard_normal(picked.shape))


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(tmp_path / "heavy.db")
    SQLiteMemoryStore(database)
    return database


def _index(db: Database, **options: int) -> SqliteVecIndex:
    """The stored tiers themselves (what a search inside a write transaction reads): the
    in-memory copy that serves other searches is tested in test_heavy_cache.py."""
    settings = {"compact_limit": 8, "heavy_limit": 64, "oversample": 4, "min_candidates": 80}
    settings.update(options)
    with db.transaction():
        return SqliteVecIndex(db, DIM, 8, cache=False, **settings)


def _fill(index: SqliteVecIndex, vectors: np.ndarray, user: str = "ann", first: int = 1
          ) -> dict[int, tuple[np.ndarray, str, MemoryCategory]]:
    rows = {}
    with index.db.transaction():
        for i, v in enumerate(vectors):
            rid = first + i
            scope = SESSION if i % 4 == 0 else USER
            category = PREF if i % 3 == 0 else FACT
            index.add(rid, user, scope, category, v)
            rows[rid] = (v, scope, category)
    return rows


def _exact(rows: dict[int, tuple[np.ndarray, str, MemoryCategory]], query: np.ndarray, k: int,
           scopes: list[str] | None = None, categories: list[MemoryCategory] | None = None,
           ) -> list[int]:
    sims = {
        rid: float(v @ query) for rid, (v, scope, cat) in rows.items()
        if (scopes is None or scope in scopes) and (not categories or cat in categories)
    }
    return sorted(sims, key=lambda r: -sims[r])[:k]


def _tier_rows(db: Database, user: str) -> tuple[int, int, int]:
    conn = db.conn
    return tuple(  # type: ignore[return-value]
        int(conn.execute(f"SELECT count(*) FROM {t} WHERE user_id = ?", (user,)).fetchone()[0])
        for t in ("memory_vectors_compact", "memory_vectors", "memory_vectors_heavy")
    )


def test_a_user_moves_to_the_heavy_tier_when_their_vectors_reach_the_limit(
    db: Database,
) -> None:
    index = _index(db)
    rng = np.random.default_rng(1)
    _fill(index, _clustered(rng, 63))
    assert index.heavy.user("ann") is None
    assert _tier_rows(db, "ann") == (7, 56, 0)
    _fill(index, _clustered(rng, 1), first=64)  # the 64th: a move to vec0, then to heavy
    assert index.heavy.user("ann") is not None
    assert _tier_rows(db, "ann") == (0, 0, 64)
    _fill(index, _clustered(rng, 5), first=65)  # later adds go straight to the heavy tier
    assert _tier_rows(db, "ann") == (0, 0, 69)
    assert index.count("ann") == 69 and index.count() == 69


def test_heavy_search_agrees_with_exact_search_and_preselects(
    db: Database, monkeypatch: pytest.MonkeyPatch,
) -> None:
    index = _index(db)
    rng = np.random.default_rng(2)
    stored = _clustered(rng, 400)
    rows = _fill(index, stored)
    reranked: list[int] = []
    original = HeavyVectors._rerank

    def spy(self: HeavyVectors, query: np.ndarray, rowids: list[int], k: int
            ) -> list[tuple[int, float]]:
        reranked.append(len(rowids))
        return original(self, query, rowids, k)

    monkeypatch.setattr(HeavyVectors, "_rerank", spy)
    shares = []
    for query in _near(rng, stored, 60):
        hits = index.search(query, "ann", scope_keys=None, categories=None, k=10)
        expected = _exact(rows, query, 10)
        shares.append(len({r for r, _ in hits} & set(expected)) / 10)
        sims = [s for _, s in hits]
        assert sims == sorted(sims, reverse=True)
        for rid, sim in hits:  # the re-rank is exact cosine
            assert sim == pytest.approx(float(rows[rid][0] @ query), abs=1e-5)
    assert reranked and max(reranked) == 80  # 80 of 400 were re-ranked, not all of them
    assert np.mean(shares) >= 0.95


def test_scope_and_category_are_prefilters_on_the_heavy_tier(db: Database) -> None:
    index = _index(db)
    rng = np.random.default_rng(3)
    rows = _fill(index, _clustered(rng, 200))
    query = _clustered(rng, 1)[0]
    with db.transaction():  # exact matches in a scope and category nobody asks for below
        for rid in range(1000, 1100):
            index.add(rid, "ann", "s2\x1f\x1f", FACT, query)
    hits = index.search(query, "ann", scope_keys=[USER, SESSION], categories=[PREF], k=10)
    assert [r for r, _ in hits] == _exact(rows, query, 10, [USER, SESSION], [PREF])
    hits = index.search(query, "ann", scope_keys=[SESSION], categories=None, k=100)
    assert {r for r, _ in hits} == {r for r, (_, s, _) in rows.items() if s == SESSION}
    assert index.search(query, "ann", scope_keys=["nobody"], categories=None, k=5) == []
    assert {r for r, _ in index.search(query, "ann", scope_keys=None, categories=None,
                                       k=5)} <= set(range(1000, 1100))
    assert index.search(query, "bob", scope_keys=None, categories=None, k=5) == []


def test_removed_vectors_are_never_found_and_the_last_one_leaves_the_tier(
    db: Database,
) -> None:
    index = _index(db)
    rng = np.random.default_rng(4)
    rows = _fill(index, _clustered(rng, 150))
    gone = list(range(1, 100))
    with db.transaction():
        index.remove(gone)
    for rid in gone:
        rows.pop(rid)
    assert index.count("ann") == 51
    for query in _clustered(rng, 10):
        hits = index.search(query, "ann", scope_keys=None, categories=None, k=60)
        assert sorted(r for r, _ in hits) == sorted(rows)
    with db.transaction():
        index.remove(list(rows))
    assert index.heavy.user("ann") is None and index.count("ann") == 0
    conn = db.conn
    for table in ("memory_vector_heavy_users", "memory_vector_blocks", "memory_vector_labels",
                  "memory_vectors_heavy"):
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table


def test_a_rolled_back_write_does_not_survive_in_the_cached_codes(db: Database) -> None:
    index = _index(db)
    rng = np.random.default_rng(5)
    _fill(index, _clustered(rng, 100))
    query = _clustered(rng, 1)[0]
    before = index.search(query, "ann", scope_keys=None, categories=None, k=5)
    with pytest.raises(RuntimeError), db.transaction():
        index.add(500, "ann", USER, FACT, query)
        assert index.search(query, "ann", scope_keys=None, categories=None, k=1)[0][0] == 500
        raise RuntimeError
    assert index.search(query, "ann", scope_keys=None, categories=None, k=5) == before
    with db.transaction():
        index.add(501, "ann", USER, FACT, query)
    assert index.search(query, "ann", scope_keys=None, categories=None, k=1)[0][0] == 501


async def test_supersession_and_forgetting_hold_for_a_heavy_user(tmp_path: Path) -> None:
    db = Database(tmp_path / "engine.db")
    store = SQLiteMemoryStore(db)
    vectors = _index(db)
    embedder = FakeEmbedder(DIM, "fake:bow-256")
    mem = HierarchicalMemory(store, vectors, FTS5TextIndex(db), embedder,
                             config=MemoryConfig(db_path=tmp_path / "engine.db"),
                             on_close=db.close)
    try:
        for n in range(0, 90, 30):
            await mem.add_many([_draft(f"note {i} about topic {i % 7} and item {i}")
                                for i in range(n, n + 30)])
        assert vectors.heavy.user("ann") is not None
        old = (await mem.search("the garden shed is painted blue", "ann", top_k=1))[0].memory
        assert old.content.startswith("note")  # nothing about a shed yet
        first = await mem.add("the garden shed is painted blue", "ann")
        assert (await mem.search("garden shed painted", "ann", top_k=1))[0].memory.id == first.id
        second = await mem.supersede(first.id, "the garden shed is painted green", user_id="ann")
        found = [r.memory.id for r in await mem.search("garden shed painted", "ann", top_k=5)]
        assert found[0] == second.id and first.id not in found
        await mem.forget(second.id, user_id="ann")
        found = [r.memory.id for r in await mem.search("garden shed painted", "ann", top_k=5)]
        assert second.id not in found and first.id not in found
        assert vectors.count("ann") == 90
    finally:
        await mem.close()


def _draft(text: str) -> object:
    from headroom.memory import MemoryDraft

    return MemoryDraft(text, "ann", dedup=False)


def test_the_migration_moves_an_older_files_heavy_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "old.db"
    old = Database(path)
    with monkeypatch.context() as m:  # the file as the code before m005 left it
        m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:4])
        SQLiteMemoryStore(old)
    rng = np.random.default_rng(6)
    heavy = _clustered(rng, HEAVY_LIMIT + 10, 16)
    light = _clustered(rng, 300, 16)
    with old.transaction():
        conn = old.conn
        conn.execute(
            "CREATE VIRTUAL TABLE memory_vectors USING vec0(user_id text partition key,"
            " embedding float[16] distance_metric=cosine, scope_key text, category text,"
            " chunk_size=128)"
        )
        conn.executemany(
            "INSERT INTO memory_vectors(rowid, user_id, embedding, scope_key, category)"
            " VALUES (?, ?, ?, ?, ?)",
            [(i + 1, "ann", v.tobytes(), USER, "fact") for i, v in enumerate(heavy)]
            + [(10_000 + i, "bob", v.tobytes(), USER, "fact") for i, v in enumerate(light)],
        )
        conn.executemany(
            "INSERT INTO memories_fts(rowid, content, user_key, scope_key, category)"
            " VALUES (?, ?, ?, ?, 'fact')",
            [(i, f"note {i}", user_token("ann" if i < 5 else "bob"), USER) for i in range(1, 8)],
        )
    assert old.conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE name = 'memory_vector_blocks'"
    ).fetchone()[0] == 0
    old.close()

    reopened = Database(path)
    try:
        assert migrations.migrate(reopened.conn) == [
            "m005_heavy_vectors", "m006_fts_user_counts", "m007_core_index", "m008_index_log",
            "m009_index_log_entries", "m010_core_covering_index",
        ]
        logged = {  # m008: every user already there starts the change log at seq 0
            (str(r[0]), str(r[1])) for r in reopened.conn.execute(
                "SELECT index_name, user_key FROM memory_index_users WHERE seq = 0"
            ).fetchall()
        }
        assert logged == {("vector", "ann"), ("vector", "bob"), ("text", user_token("ann")),
                          ("text", user_token("bob"))}
        text = FTS5TextIndex(reopened)
        assert (text.count("ann"), text.count("bob"), text.count("carol")) == (4, 3, 0)
        index = SqliteVecIndex(reopened, 16)
        assert index.heavy.user("ann") is not None and index.heavy.user("bob") is None
        assert _tier_rows(reopened, "ann") == (0, 0, HEAVY_LIMIT + 10)
        assert index.count("bob") == 300
        rows = {i + 1: (v, USER, FACT) for i, v in enumerate(heavy)}
        query = _clustered(rng, 1, 16)[0]
        hits = index.search(query, "ann", scope_keys=[USER], categories=None, k=10)
        assert [r for r, _ in hits] == _exact(rows, query, 10)
    finally:
        reopened.close()


def test_the_text_index_counts_a_users_rows_as_it_writes(db: Database) -> None:
    text = FTS5TextIndex(db)
    with db.transaction():
        for rid in range(1, 6):
            text.add(rid, "ann", USER, FACT, f"ann likes tea number {rid}")
        text.add(9, "bob", USER, FACT, "bob likes coffee")
    assert (text.count("ann"), text.count("bob"), text.count()) == (5, 1, 6)
    with db.transaction():
        text.remove([1, 2, 77])  # 77 was never there
    assert text.count("ann") == 3
    hits = text.search("tea", "ann", scope_keys=None, categories=None, k=10)
    assert sorted(r for r, _ in hits) == [3, 4, 5]
    with db.transaction():
        text.remove([3, 4, 5, 9])
    assert (text.count("ann"), text.count("bob")) == (0, 0)
    assert db.conn.execute("SELECT count(*) FROM memories_fts_users").fetchone()[0] == 0


def test_a_heavy_users_text_search_ranks_then_filters_with_the_same_answer(
    db: Database,
) -> None:
    words = ["tea", "coffee", "garden", "shed", "blue", "green", "walk", "dog", "rain", "sun"]
    rng = np.random.default_rng(8)
    with db.transaction():
        writer = FTS5TextIndex(db)
        for rid in range(1, 301):
            text = " ".join(rng.choice(words, size=int(rng.integers(2, 7))))
            scope = SESSION if rid % 5 == 0 else ("s2\x1f\x1f" if rid % 5 == 1 else USER)
            writer.add(rid, "ann", scope, PREF if rid % 3 == 0 else FACT, text)
    exact = FTS5TextIndex(db, heavy_rows=10**9)  # today's query: the filters inside the MATCH
    heavy = FTS5TextIndex(db, heavy_rows=100, filter_depth=2)
    asked = 0
    for query in ("tea garden", "blue shed dog", "rain", "sun walk green coffee"):
        for scopes, categories in (([USER], None), ([USER, SESSION], [PREF]), ([SESSION], None),
                                   (["s9\x1f\x1f"], None)):
            for k in (3, 10, 40):
                expected = exact.search(query, "ann", scope_keys=scopes, categories=categories,
                                        k=k)
                assert heavy.search(query, "ann", scope_keys=scopes, categories=categories,
                                    k=k) == expected
                asked += bool(expected)
    assert asked > 30  # most of the cases had answers to compare


def test_the_cached_codes_follow_this_process_and_other_processes_writes(
    db: Database, monkeypatch: pytest.MonkeyPatch,
) -> None:
    index = _index(db)
    rng = np.random.default_rng(9)
    _fill(index, _clustered(rng, 100))
    query = _clustered(rng, 1)[0]
    index.search(query, "ann", scope_keys=None, categories=None, k=5)
    reads: list[str] = []
    original = HeavyVectors._read_codes

    def spy(self: HeavyVectors, user_id: str) -> object:
        reads.append(user_id)
        return original(self, user_id)

    monkeypatch.setattr(HeavyVectors, "_read_codes", spy)
    with db.transaction():  # this process's writes patch the cached entry
        index.add(600, "ann", USER, FACT, query)
        index.remove([600])
        index.add(601, "ann", USER, FACT, query)
    assert index.search(query, "ann", scope_keys=None, categories=None, k=1)[0][0] == 601
    assert reads == []
    other = _index(db)  # another process: its own cache, the same file
    with db.transaction():
        other.remove([601])
        other.add(602, "ann", SESSION, PREF, query)
    hits = index.search(query, "ann", scope_keys=[SESSION], categories=[PREF], k=1)
    assert hits[0][0] == 602 and reads == ["ann"]
    assert 601 not in {r for r, _ in index.search(query, "ann", scope_keys=None,
                                                  categories=None, k=10)}
