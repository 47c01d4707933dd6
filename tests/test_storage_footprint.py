"""What a new user costs on disk (issue 9, item 3: ~204 KiB each, so invented user ids could fill
the disk), and the vector index that keeps it small: exact for small users, vec0 past a limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from headroom.memory.adapters import SQLiteMemoryStore, SqliteVecIndex
from headroom.memory.db import Database, connect
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import MemoryCategory, MemoryConfig
from tests.fakes import FakeEmbedder

DIM = 384  # MiniLM's: vec0 chunks, and so the old cost per user, scale with it


def _db_bytes(path: Path) -> int:
    """The database's size in pages, the WAL's included (what the file grows to)."""
    conn = connect(path)
    try:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        return int(pages) * int(conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()


async def test_a_new_user_with_one_memory_costs_at_most_16_kib(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    mem = await HierarchicalMemory.create(
        MemoryConfig(db_path=path), embedder=FakeEmbedder(DIM, "fake:bow-384")
    )
    try:
        for user in range(10):  # a file that already has users
            for n in range(3):
                await mem.add(f"Existing user {user} likes tea number {n}", f"old-{user}")
        before = _db_bytes(path)
        new_users = 60
        for user in range(new_users):
            await mem.add(f"Prefers short answers, lives in town {user}", f"new-{user}")
        per_user = (_db_bytes(path) - before) / new_users
        assert per_user <= 16 * 1024, f"{per_user:.0f} bytes per new user"
        assert (await mem.stats())["vectors"] == 30 + new_users
    finally:
        await mem.close()


@pytest.fixture
def index(tmp_path: Path) -> SqliteVecIndex:
    db = Database(tmp_path / "vectors.db")
    SQLiteMemoryStore(db)
    with db.transaction():
        return SqliteVecIndex(db, 16, 8, compact_limit=8)


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(16).astype(np.float32)
    return v / np.linalg.norm(v)


def _compact_rows(index: SqliteVecIndex, user: str) -> int:
    return int(
        index.db.conn.execute(
            "SELECT count(*) FROM memory_vectors_compact WHERE user_id = ?", (user,)
        ).fetchone()[0]
    )


def test_search_is_exact_on_both_sides_of_the_move_to_vec0(index: SqliteVecIndex) -> None:
    rng = np.random.default_rng(7)
    vectors: dict[int, tuple[np.ndarray, str, MemoryCategory]] = {}
    for rid in range(1, 22):  # 21 vectors: two moves of 8, 5 left in the compact table
        scope = "u:ann" if rid % 3 else "s:ann:s1"
        category = MemoryCategory.FACT if rid % 2 else MemoryCategory.PREFERENCE
        vectors[rid] = (_unit(rng), scope, category)
        with index.db.transaction():
            index.add(rid, "ann", scope, category, vectors[rid][0])
        index.add(100 + rid, "bob", "u:bob", MemoryCategory.FACT, _unit(rng))  # no transaction
    assert _compact_rows(index, "ann") == 5
    assert index.count("ann") == 21 and index.count() == 42
    for _ in range(10):
        query = _unit(rng)
        for scopes, categories in ((None, None), (["u:ann"], [MemoryCategory.FACT])):
            chosen = {
                rid: float(v @ query)
                for rid, (v, scope, cat) in vectors.items()
                if (scopes is None or scope in scopes) and (categories is None or cat in categories)
            }
            expected = sorted(chosen, key=lambda r: -chosen[r])[:6]
            hits = index.search(query, "ann", scope_keys=scopes, categories=categories, k=6)
            assert [rid for rid, _ in hits] == expected
            assert all(abs(score - chosen[rid]) < 1e-5 for rid, score in hits)


def test_remove_finds_a_vector_in_either_table(index: SqliteVecIndex) -> None:
    rng = np.random.default_rng(3)
    for rid in range(1, 11):  # 8 moved to vec0, 2 compact
        index.add(rid, "ann", "u:ann", MemoryCategory.FACT, _unit(rng))
    index.remove([1, 10])  # one from each side
    assert index.count("ann") == 8
    hits = index.search(_unit(rng), "ann", scope_keys=None, categories=None, k=20)
    assert sorted(rid for rid, _ in hits) == list(range(2, 10))


def test_a_rolled_back_add_moves_nothing(index: SqliteVecIndex) -> None:
    rng = np.random.default_rng(5)
    for rid in range(1, 8):
        index.add(rid, "ann", "u:ann", MemoryCategory.FACT, _unit(rng))
    with pytest.raises(RuntimeError), index.db.transaction():
        index.add(8, "ann", "u:ann", MemoryCategory.FACT, _unit(rng))  # the 8th: a move
        raise RuntimeError
    assert (_compact_rows(index, "ann"), index.count("ann")) == (7, 7)
