"""One SQLite file: reopening needs no rebuild, other processes read it while it is open, and
concurrent writers neither corrupt nor lose rows."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from headroom.memory.db import connect
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.migrations import MIGRATIONS
from headroom.memory.models import MemoryConfig, MemoryFilter
from tests.fakes import FakeEmbedder

ROOT = Path(__file__).resolve().parent.parent
# Vectors of users with few memories sit in the compact table, the rest in sqlite-vec's.
VECTOR_COUNT = (
    "SELECT (SELECT count(*) FROM memory_vectors) + (SELECT count(*) FROM memory_vectors_compact)"
)


async def open_memory(path: Path) -> HierarchicalMemory:
    return await HierarchicalMemory.create(MemoryConfig(db_path=path), embedder=FakeEmbedder())


def raw(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = connect(path)
    try:
        return [tuple(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.mark.sqlite_only("checks the SQLite migrations recorded in the file")
async def test_reopen_needs_no_rebuild(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    mem = await open_memory(path)
    tea = await mem.add("Drinks oolong tea every morning", "alice", "s1")
    old = await mem.add("Lives in Berlin", "alice")
    new = await mem.supersede(old.id, "Lives in Paris")
    await mem.add("Plays the cello", "bob")
    await mem.close()

    fake = FakeEmbedder()
    reopened = await HierarchicalMemory.create(MemoryConfig(db_path=path), embedder=fake)
    try:
        current = await reopened.query(MemoryFilter(user_id="alice", session_id="s1"))
        assert {m.id for m in current} == {tea.id, new.id}
        hits = await reopened.search("oolong tea morning", "alice", "s1", top_k=1)
        assert [r.memory.id for r in hits] == [tea.id]
        assert [r.memory.id for r in await reopened.text_search("cello", "bob")] == [
            (await reopened.query(MemoryFilter(user_id="bob")))[0].id
        ]
        assert await reopened.text_search("Berlin", "alice") == []
        assert [m.content for m in await reopened.get_history(new.id)] == [
            "Lives in Berlin", "Lives in Paris"
        ]
        # only the query was embedded: nothing was re-indexed on open
        assert fake.calls == [["oolong tea morning"]]
        stats = await reopened.stats()
        assert (stats["current"], stats["vectors"], stats["fts_rows"]) == (3, 3, 3)
    finally:
        await reopened.close()
    # migrations ran once, on the first open
    assert sorted(raw(path, "SELECT name FROM schema_version")) == [(n,) for n, _ in MIGRATIONS]


@pytest.mark.sqlite_only("a child process opens the SQLite file by its path")
async def test_another_process_reads_while_open(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    mem = await open_memory(path)
    try:
        m = await mem.add("Drinks oolong tea every morning", "alice")
        await mem.add("Plays the cello", "bob")
        code = """
            import asyncio, json, sys
            from headroom.memory.hierarchical import HierarchicalMemory
            from headroom.memory.models import MemoryConfig, MemoryFilter
            from tests.fakes import FakeEmbedder

            async def main():
                mem = await HierarchicalMemory.create(
                    MemoryConfig(db_path=sys.argv[1]), embedder=FakeEmbedder())
                try:
                    out = {
                        "query": [x.id for x in await mem.query(MemoryFilter(user_id="alice"))],
                        "search": [r.memory.id for r in await mem.search("oolong", "alice")],
                        "text": [r.memory.id for r in await mem.text_search("tea", "alice")],
                        "bob": [r.memory.content for r in await mem.text_search("tea", "bob")],
                    }
                finally:
                    await mem.close()
                print(json.dumps(out))

            asyncio.run(main())
        """
        proc = await asyncio.to_thread(run_python, code, str(path))
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out == {"query": [m.id], "search": [m.id], "text": [m.id], "bob": []}
        # and the first instance still works after the other process closed its connections
        await mem.add("Owns a red bicycle", "alice")
        assert len(await mem.query(MemoryFilter(user_id="alice"))) == 2
    finally:
        await mem.close()


@pytest.mark.sqlite_only("holds a write transaction on the SQLite file (WAL readers)")
async def test_readers_are_not_blocked_by_an_open_write(tmp_path: Path) -> None:
    """WAL: a reader sees the last commit while another connection holds a write transaction."""
    path = tmp_path / "m.db"
    mem = await open_memory(path)
    try:
        m = await mem.add("Drinks oolong tea", "alice")
        writer = connect(path)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE memories SET content = 'uncommitted' WHERE id = ?", (m.id,))
        try:
            rows = await asyncio.wait_for(
                mem.query(MemoryFilter(user_id="alice")), timeout=5
            )
            assert [r.content for r in rows] == ["Drinks oolong tea"]
            hits = await asyncio.wait_for(mem.text_search("oolong", "alice"), timeout=5)
            assert [r.memory.id for r in hits] == [m.id]
        finally:
            writer.execute("ROLLBACK")
            writer.close()
    finally:
        await mem.close()


@pytest.mark.sqlite_only("checks the SQLite file's integrity and raw tables")
async def test_two_instances_writing_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    first, second = await open_memory(path), await open_memory(path)
    try:
        n = 40
        await asyncio.gather(
            *(first.add(f"first instance note {i} alpha{i}", f"user{i % 3}", dedup=False)
              for i in range(n)),
            *(second.add(f"second instance note {i} beta{i}", f"user{i % 3}", dedup=False)
              for i in range(n)),
            # the same fact from both at once is still one row
            first.add("Shared fact about zebras", "user0"),
            second.add("Shared fact about zebras", "user0"),
        )
        old = await first.add("Status is draft", "user0")
        new = await second.supersede(old.id, "Status is final")
    finally:
        await first.close()
        await second.close()

    assert raw(path, "PRAGMA integrity_check") == [("ok",)]
    total = 2 * n + 1 + 2
    assert raw(path, "SELECT count(*) FROM memories") == [(total,)]
    assert raw(path, "SELECT count(*) FROM memories WHERE valid_until IS NULL") == [(total - 1,)]
    assert raw(path, VECTOR_COUNT) == [(total - 1,)]
    assert raw(path, "SELECT count(*) FROM memories_fts") == [(total - 1,)]
    assert raw(path, "SELECT count(*) FROM memories WHERE content LIKE 'Shared%'") == [(1,)]
    assert raw(path, "SELECT superseded_by FROM memories WHERE id = ?", (old.id,)) == [(new.id,)]


@pytest.mark.sqlite_only("a child process opens the SQLite file by its path")
async def test_a_second_process_writing_at_the_same_time(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    mem = await open_memory(path)
    code = """
        import asyncio, sys
        from headroom.memory.hierarchical import HierarchicalMemory, MemoryDraft
        from headroom.memory.models import MemoryConfig
        from tests.fakes import FakeEmbedder

        async def main():
            mem = await HierarchicalMemory.create(
                MemoryConfig(db_path=sys.argv[1]), embedder=FakeEmbedder())
            try:
                for i in range(30):
                    await mem.add(f"child process note {i} gamma{i}", "carol", dedup=False)
            finally:
                await mem.close()

        asyncio.run(main())
    """
    try:
        child = asyncio.create_task(asyncio.to_thread(run_python, code, str(path)))
        written = 0
        while not child.done() or written < 30:  # keep writing for as long as the child runs
            await mem.add(
                f"parent process note {written} delta{written}", "carol", dedup=False
            )
            written += 1
        proc = await child
        assert proc.returncode == 0, proc.stderr
        total = written + 30
        assert len(await mem.query(MemoryFilter(user_id="carol", limit=None))) == total
        assert len(await mem.text_search("gamma7", "carol")) == 1
        hits = await mem.search("child process note 3 gamma3", "carol", top_k=1)
        assert [r.memory.content for r in hits] == ["child process note 3 gamma3"]
    finally:
        await mem.close()
    assert raw(path, "PRAGMA integrity_check") == [("ok",)]
    assert raw(path, VECTOR_COUNT) == [(total,)]
    assert raw(path, "SELECT count(*) FROM memories_fts") == [(total,)]
