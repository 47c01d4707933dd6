"""The per-process, per-user copies of the SQLite vector and text indexes (issue 14): they give
the file's answers (exact cosine, FTS5's own bm25 scores), apply scope and category exactly,
and stay coherent with writes made through another connection or process, with rollbacks and
with purges, through the per-user change log (adapters/index_log.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from headroom.memory.adapters import FTS5TextIndex, SqliteVecIndex, index_log
from headroom.memory.adapters.cached_vectors import _hamming, _nearest
from headroom.memory.adapters.fts5_index import user_token
from headroom.memory.adapters.user_cache import UserCache
from headroom.memory.db import Database
from headroom.memory.models import MemoryCategory
from tests.index_files import index_file, unit

pytestmark = pytest.mark.sqlite_only("the in-memory copies serve the SQLite indexes")

DIM = 32
FACT, PREF = MemoryCategory.FACT, MemoryCategory.PREFERENCE
USER_SCOPE, SESSION_SCOPE = "ann\x1f\x1f", "ann\x1fs1\x1f"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return index_file(tmp_path / "cache.db", DIM)


def _vectors(db: Database, cache: UserCache | bool, **options: int) -> SqliteVecIndex:
    settings = {"compact_limit": 8, "heavy_limit": 64}
    settings.update(options)
    return SqliteVecIndex(db, DIM, 8, cache=cache, **settings)


def _fill(index: SqliteVecIndex, vectors: np.ndarray, user: str = "ann", first: int = 1) -> None:
    with index.db.transaction():
        for i, v in enumerate(vectors):
            scope = SESSION_SCOPE if i % 4 == 0 else USER_SCOPE
            index.add(first + i, user, scope, PREF if i % 3 == 0 else FACT, v)


# --- vectors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [5, 40, 200])  # compact only, vec0, heavy tier
def test_cached_vector_search_is_the_files_exact_answer_with_filters(
    path: Path, size: int
) -> None:
    db = Database(path)
    cached, stored = _vectors(db, UserCache()), _vectors(db, False)
    rng = np.random.default_rng(size)
    _fill(cached, unit(rng.standard_normal((size, DIM))))
    _fill(cached, unit(rng.standard_normal((30, DIM))), user="bob", first=10_000)
    cached.warm("ann")  # a heavy-tier user's copy is otherwise read on a background thread
    for query in unit(rng.standard_normal((20, DIM))):
        for scopes, cats in ((None, None), ([USER_SCOPE], None), (None, [PREF]),
                             ([SESSION_SCOPE, USER_SCOPE], [FACT]), (["nowhere"], None)):
            got = cached.search(query, "ann", scope_keys=scopes, categories=cats, k=10)
            if size < 64:  # the heavy tier's own search is approximate; below it, exact
                want = stored.search(query, "ann", scope_keys=scopes, categories=cats, k=10)
                assert [r for r, _ in got] == [r for r, _ in want]
                assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)
            assert all(r < 10_000 for r, _ in got)  # never another user's
            for rid, _ in got:
                scope = SESSION_SCOPE if (rid - 1) % 4 == 0 else USER_SCOPE
                cat = PREF if (rid - 1) % 3 == 0 else FACT
                assert scopes is None or scope in scopes
                assert cats is None or cat in cats
    assert cached.cache is not None and len(cached.cache) == 1  # bob was never searched


def test_sign_bit_preselection_agrees_with_exact_search(path: Path) -> None:
    db = Database(path)
    index = _vectors(db, UserCache(), bits_from=256, min_candidates=150, oversample=6)
    rng = np.random.default_rng(7)
    topics = rng.standard_normal((30, DIM))
    stored = unit(2 + topics[rng.integers(0, 30, 1500)] + 0.5 * rng.standard_normal((1500, DIM)))
    _fill(index, stored)
    index.warm("ann")
    shares = []
    for query in unit(stored[rng.integers(0, 1500, 50)] + 0.05 * rng.standard_normal((50, DIM))):
        got = index.search(query, "ann", scope_keys=[USER_SCOPE], categories=None, k=10)
        sims = stored @ query
        allowed = np.array([i % 4 != 0 for i in range(1500)])
        exact = (np.argsort(-np.where(allowed, sims, -9))[:10] + 1).tolist()
        shares.append(len({r for r, _ in got} & set(exact)) / 10)
        for rid, sim in got:  # the re-rank is exact cosine, and the filter exact
            assert sim == pytest.approx(float(sims[rid - 1]), abs=1e-5)
            assert (rid - 1) % 4 != 0
    assert np.mean(shares) >= 0.95


@pytest.mark.parametrize("dimension", [32, 384, 3072])
def test_hamming_distances_are_exact_and_filtered_rows_come_after_every_kept_one(
    dimension: int,
) -> None:
    rng = np.random.default_rng(dimension)
    bits = rng.random((500, dimension)) < 0.5
    query = rng.random(dimension) < 0.5
    words_per_row = -(-dimension // 64)

    def packed(b: np.ndarray) -> np.ndarray:
        padded = np.zeros((*b.shape[:-1], words_per_row * 64), dtype=bool)
        padded[..., :dimension] = b
        return np.packbits(padded, axis=-1).view(np.uint64)

    words, qwords = np.ascontiguousarray(packed(bits).T), packed(query)
    keep = rng.random(500) < 0.3
    exact = (bits != query).sum(axis=1)
    assert _hamming(words, qwords, None).tolist() == exact.tolist()
    filtered = _hamming(words, qwords, keep)
    assert filtered[keep].tolist() == exact[keep].tolist()
    assert filtered[~keep].min() > dimension  # never within any cut a kept row can set
    for want in (1, 10, int(keep.sum())):
        assert keep[_nearest(filtered, want)].all()


def test_a_write_through_another_connection_is_seen_and_a_removal_never_served(
    path: Path,
) -> None:
    reader_db, writer_db = Database(path), Database(path)  # two connections, as two processes
    reader, writer = _vectors(reader_db, UserCache()), _vectors(writer_db, UserCache())
    rng = np.random.default_rng(3)
    stored = unit(rng.standard_normal((120, DIM)))
    _fill(writer, stored)
    reader.warm("ann")  # from here on the reader's copy replays the writer's log
    query = stored[5]
    assert reader.search(query, "ann", scope_keys=None, categories=None, k=1)[0][0] == 6
    with writer_db.transaction():
        writer.remove([6])
    hits = reader.search(query, "ann", scope_keys=None, categories=None, k=120)
    assert 6 not in {r for r, _ in hits} and len(hits) == 119
    with writer_db.transaction():
        writer.add(500, "ann", USER_SCOPE, FACT, query)
    assert reader.search(query, "ann", scope_keys=None, categories=None, k=1)[0][0] == 500
    with writer_db.transaction():  # a row id used again for another vector
        writer.remove([500])
        writer.add(500, "ann", USER_SCOPE, FACT, stored[7])
    top = reader.search(stored[7], "ann", scope_keys=None, categories=None, k=2)
    assert {r for r, _ in top} == {8, 500}
    assert reader.search(query, "ann", scope_keys=None, categories=None, k=1)[0][0] != 500


def test_another_process_writes_are_seen(path: Path) -> None:
    db = Database(path)
    index = _vectors(db, UserCache())
    rng = np.random.default_rng(4)
    stored = unit(rng.standard_normal((50, DIM)))
    _fill(index, stored)
    assert len(index.search(stored[0], "ann", scope_keys=None, categories=None, k=100)) == 50
    script = textwrap.dedent(f"""
        import numpy as np
        from headroom.memory.adapters import SqliteVecIndex, FTS5TextIndex
        from headroom.memory.db import Database
        from headroom.memory.models import MemoryCategory
        db = Database({str(path)!r})
        index = SqliteVecIndex(db, {DIM}, 8, compact_limit=8, heavy_limit=64)
        with db.transaction():
            index.remove([1, 2, 3])
            index.add(900, "ann", {USER_SCOPE!r}, MemoryCategory.FACT,
                      np.ones({DIM}, dtype=np.float32))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    hits = {r for r, _ in index.search(stored[0], "ann", scope_keys=None, categories=None,
                                       k=100)}
    assert 900 in hits and not hits & {1, 2, 3} and len(hits) == 48


def test_a_rolled_back_write_never_reaches_the_copy(path: Path) -> None:
    db = Database(path)
    index = _vectors(db, UserCache())
    rng = np.random.default_rng(5)
    stored = unit(rng.standard_normal((20, DIM)))
    _fill(index, stored)
    index.search(stored[0], "ann", scope_keys=None, categories=None, k=1)  # cached now
    probe = unit(rng.standard_normal(DIM))
    with pytest.raises(RuntimeError), db.transaction():
        index.add(77, "ann", USER_SCOPE, FACT, probe)
        # inside the write transaction the file is read (the row is visible to its writer)
        assert index.search(probe, "ann", scope_keys=None, categories=None, k=1)[0][0] == 77
        raise RuntimeError("roll back")
    assert index.search(probe, "ann", scope_keys=None, categories=None, k=1)[0][0] != 77
    _fill(index, stored[:1], first=78)  # the next committed write may reuse the log's seq
    hits = {r for r, _ in index.search(probe, "ann", scope_keys=None, categories=None, k=50)}
    assert 78 in hits and 77 not in hits


def test_a_purged_user_leaves_no_log_and_a_new_life_starts_clean(path: Path) -> None:
    db = Database(path)
    index = _vectors(db, UserCache())
    rng = np.random.default_rng(6)
    stored = unit(rng.standard_normal((70, DIM)))  # into the heavy tier
    _fill(index, stored)
    index.warm("ann")
    other = _vectors(Database(path), UserCache())
    with other.db.transaction():
        other.remove(list(range(1, 71)))
    conn = db.conn
    assert index_log.state(conn, "vector", "ann") is None
    assert conn.execute(
        "SELECT count(*) FROM memory_index_log WHERE user_key = 'ann'"
    ).fetchone()[0] == 0
    assert index.search(stored[0], "ann", scope_keys=None, categories=None, k=5) == []
    with other.db.transaction():
        other.add(200, "ann", USER_SCOPE, FACT, stored[0])
    assert index.search(stored[0], "ann", scope_keys=None, categories=None, k=5) == [
        (200, pytest.approx(1.0, abs=1e-5))
    ]


def test_a_copy_behind_the_kept_log_is_rebuilt(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(index_log, "KEEP", 4)
    db = Database(path)
    reader, writer = _vectors(db, UserCache()), _vectors(Database(path), UserCache())
    rng = np.random.default_rng(8)
    stored = unit(rng.standard_normal((40, DIM)))
    _fill(writer, stored[:10])
    reader.search(stored[0], "ann", scope_keys=None, categories=None, k=1)
    for i in range(10, 40):  # 30 writes: the log keeps the last 4 to 8
        _fill(writer, stored[i : i + 1], first=i + 1)
    with writer.db.transaction():
        writer.remove([1])
    _, floor = index_log.state(db.conn, "vector", "ann") or (0, 0)
    assert floor > 12  # the reader's copy (seq 10) is behind what is kept
    hits = reader.search(stored[0], "ann", scope_keys=None, categories=None, k=100)
    assert {r for r, _ in hits} == set(range(2, 41))


def test_the_cache_evicts_the_least_recently_used_past_its_bytes(path: Path) -> None:
    db = Database(path)
    cache = UserCache()
    index = _vectors(db, cache)
    rng = np.random.default_rng(9)
    for n, user in enumerate(("a", "b", "c")):
        _fill(index, unit(rng.standard_normal((40, DIM))), user=user, first=1 + 100 * n)
    q = unit(rng.standard_normal(DIM))
    index.search(q, "a", scope_keys=None, categories=None, k=3)
    cache.max_bytes = int(cache.nbytes * 2.5)  # room for two users of this size
    for user in ("b", "a", "c"):
        index.search(q, user, scope_keys=None, categories=None, k=3)
    assert cache.nbytes <= cache.max_bytes and len(cache) == 2
    assert cache.get(index._owner, "b") is None and cache.get(index._owner, "a") is not None


def test_a_heavy_users_first_copy_is_read_in_the_background_while_the_file_answers(
    path: Path,
) -> None:
    db = Database(path)
    cache = UserCache()
    index, stored_index = _vectors(db, cache), _vectors(db, False)
    rng = np.random.default_rng(10)
    stored = unit(rng.standard_normal((100, DIM)))
    _fill(index, stored)  # past heavy_limit (64)
    query = stored[3]
    first = index.search(query, "ann", scope_keys=None, categories=None, k=5)
    assert first == stored_index.search(query, "ann", scope_keys=None, categories=None, k=5)
    index.builder.join(timeout=60)
    assert cache.get(index._owner, "ann") is not None
    again = index.search(query, "ann", scope_keys=None, categories=None, k=1)
    assert again[0][0] == 4 and again[0][1] == pytest.approx(1.0, abs=1e-5)


# --- text ------------------------------------------------------------------------------------

_TEXTS = [
    "Ann runs every morning before work", "Running shoes for the café trip",
    "she ran a marathon in Zürich", "the cafe near the office serves crêpes",
    "Ann likes running and cycling", "cycling to work on rainy days",
    "a note about foo_bar settings", "Runs, runs and more runs!",
    "office plants need water", "marathon training: long runs on Sunday",
]


def _texts(db: Database, cache: UserCache | bool) -> FTS5TextIndex:
    return FTS5TextIndex(db, cache=cache)


def _fill_text(index: FTS5TextIndex, user: str, first: int, texts: list[str]) -> None:
    with index.db.transaction():
        for i, text in enumerate(texts):
            index.add(first + i, user, SESSION_SCOPE if i % 3 == 0 else USER_SCOPE,
                      PREF if i % 2 else FACT, text)


@pytest.mark.parametrize("query", [
    "running", "Runs marathon", "cafe", "CAFÉ crêpe", "office work water", "zurich",
    "foo_bar", "nothing matches here", "ann",
])
def test_cached_bm25_is_fts5s_own_ranking_and_scores(path: Path, query: str) -> None:
    db = Database(path)
    cached, fts5 = _texts(db, UserCache()), _texts(db, False)
    _fill_text(cached, "ann", 1, _TEXTS * 3)  # repeats: ties, broken as FTS5 breaks them
    _fill_text(cached, "bob", 1000, _TEXTS[:4])  # other users count in N, avgdl and idf
    for scopes, cats in ((None, None), ([USER_SCOPE], None), (None, [PREF]),
                         ([SESSION_SCOPE], [FACT])):
        got = cached.search(query, "ann", scope_keys=scopes, categories=cats, k=7)
        want = fts5.search(query, "ann", scope_keys=scopes, categories=cats, k=7)
        assert [r for r, _ in got] == [r for r, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-12)
    assert cached.cache is not None
    assert len(cached.cache) == (0 if query == "foo_bar" else 1)  # a phrase: FTS5 answers


def test_text_writes_through_another_connection_are_seen_and_removals_never_served(
    path: Path,
) -> None:
    reader, writer = _texts(Database(path), UserCache()), _texts(Database(path), UserCache())
    fts5 = _texts(Database(path), False)
    _fill_text(writer, "ann", 1, _TEXTS)
    assert {r for r, _ in reader.search("runs", "ann", scope_keys=None, categories=None,
                                        k=10)} == {1, 2, 5, 8, 10}
    with writer.db.transaction():
        writer.remove([8, 10])
        writer.add(50, "ann", USER_SCOPE, FACT, "runs runs runs")
    got = reader.search("runs", "ann", scope_keys=None, categories=None, k=10)
    assert got[0][0] == 50 and not {r for r, _ in got} & {8, 10}
    assert got == fts5.search("runs", "ann", scope_keys=None, categories=None, k=10)
    with writer.db.transaction():  # the whole user purged
        writer.remove([1, 2, 3, 4, 5, 6, 7, 9, 50])
    assert reader.search("runs", "ann", scope_keys=None, categories=None, k=10) == []
    assert index_log.state(reader.db.conn, "text", user_token("ann")) is None
