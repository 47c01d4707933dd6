"""Each MemoryConfig knob changes what the engine does (a field nothing reads would fail here)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from headroom.memory.adapters.sqlite_vec_index import COMPACT_LIMIT
from headroom.memory.db import connect
from headroom.memory.errors import ConfigError
from headroom.memory.hierarchical import HierarchicalMemory, MemoryDraft
from headroom.memory.models import MemoryConfig
from tests.fakes import FakeEmbedder


async def _fill_many_users(path: Path, chunk_size: int, users: int, per_user: int) -> int:
    mem = await HierarchicalMemory.create(
        MemoryConfig(db_path=path, vector_chunk_size=chunk_size), embedder=FakeEmbedder()
    )
    await mem.add_many(
        [
            MemoryDraft(f"fact number {i} of {u}", user_id=f"user-{u}", dedup=False)
            for u in range(users)
            for i in range(per_user)
        ]
    )
    await mem.close()
    conn = connect(path)
    try:
        ddl = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'memory_vectors'").fetchone()
        assert f"chunk_size={chunk_size}" in ddl[0]
        conn.execute("VACUUM")
    finally:
        conn.close()
    return path.stat().st_size


@pytest.mark.sqlite_only("measures the SQLite file per sqlite-vec chunk size")
async def test_vector_chunk_size_bounds_per_user_storage(tmp_path: Path) -> None:
    # Users move into sqlite-vec partitions once they hold COMPACT_LIMIT vectors; from then on
    # each partition takes its chunks whole: 1024 slots of 64 floats where 8-slot chunks fit.
    users = 4
    small = await _fill_many_users(tmp_path / "small.db", 8, users, COMPACT_LIMIT)
    large = await _fill_many_users(tmp_path / "large.db", 1024, users, COMPACT_LIMIT)
    unused_slots = users * (1024 - COMPACT_LIMIT)
    assert large - small > 0.9 * unused_slots * 64 * 4


def test_vector_chunk_size_must_be_a_multiple_of_8() -> None:
    with pytest.raises(ConfigError, match="multiple of 8"):
        MemoryConfig(db_path=":memory:", vector_chunk_size=12)


async def test_cache_enabled_and_size(tmp_path: Path) -> None:
    on = await HierarchicalMemory.create(
        MemoryConfig(db_path=tmp_path / "a.db", cache_max_size=2), embedder=FakeEmbedder()
    )
    off = await HierarchicalMemory.create(
        MemoryConfig(db_path=tmp_path / "b.db", cache_enabled=False), embedder=FakeEmbedder()
    )
    try:
        for mem in (on, off):
            ids = [(await mem.add(f"distinct fact {w}", "u")).id for w in ("one", "two", "six")]
            for memory_id in ids:
                await mem.get(memory_id)
        assert on.cache is not None and len(on.cache) == 2  # bounded by cache_max_size
        assert off.cache is None
    finally:
        await on.close()
        await off.close()


async def test_query_embedding_cache_size(tmp_path: Path) -> None:
    for size, expected_calls in ((16, 1), (0, 3)):
        embedder = FakeEmbedder()
        mem = await HierarchicalMemory.create(
            MemoryConfig(db_path=tmp_path / f"q{size}.db", query_embedding_cache_size=size),
            embedder=embedder,
        )
        try:
            for _ in range(3):
                await mem.embed_query("what language do I like?")
        finally:
            await mem.close()
        assert len(embedder.calls) == expected_calls


async def test_reader_threads_sizes_the_read_pool(tmp_path: Path) -> None:
    mem = await HierarchicalMemory.create(
        MemoryConfig(db_path=tmp_path / "r.db", reader_threads=2), embedder=FakeEmbedder()
    )
    seen: set[str] = set()
    barrier = threading.Barrier(2, timeout=10)

    def read() -> None:
        seen.add(threading.current_thread().name)
        barrier.wait()  # two reads can only meet here if two reader threads exist

    try:
        await asyncio.gather(mem._executors.read(read), mem._executors.read(read))
    finally:
        await mem.close()
    assert len(seen) == 2 and all(name.startswith("headroom-reader") for name in seen)


@pytest.mark.sqlite_only("counts FTS5 segments in the SQLite file")
async def test_optimize_merges_full_text_segments(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    mem = await HierarchicalMemory.create(MemoryConfig(db_path=path), embedder=FakeEmbedder())
    try:
        for i in range(40):  # one transaction each: one small FTS5 segment each
            await mem.add(f"fact {i} about topic{i}", "u", dedup=False)
        conn = connect(path)
        before = conn.execute("SELECT count(*) FROM memories_fts_data").fetchone()[0]
        await mem.optimize()
        after = conn.execute("SELECT count(*) FROM memories_fts_data").fetchone()[0]
        conn.close()
        assert after < before
        assert [r.memory.content for r in await mem.text_search("topic7", "u")] == [
            "fact 7 about topic7"
        ]
    finally:
        await mem.close()


@pytest.mark.sqlite_only("reads sqlite-vec partitions")
async def test_vector_partitions_are_indexed(tmp_path: Path) -> None:
    path = tmp_path / "i.db"
    mem = await HierarchicalMemory.create(MemoryConfig(db_path=path), embedder=FakeEmbedder())
    await mem.close()
    conn = connect(path)
    try:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT chunk_id FROM memory_vectors_chunks WHERE partition00 = ?",
            ("u",),
        ).fetchall()
    finally:
        conn.close()
    assert "memory_vectors_chunks_by_user" in " ".join(str(tuple(r)) for r in plan)
