"""The write-behind path: outbox ops are applied exactly once, survive restarts, and bad ops are
dropped without blocking the queue."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from headroom.memory.errors import EmbedderError
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import (
    AddOp,
    ForgetOp,
    MemoryCategory,
    MemoryConfig,
    MemoryFilter,
    MemoryOps,
    Scope,
    ScopeLevel,
    UpdateOp,
)
from tests.fakes import FakeEmbedder

ROOT = Path(__file__).resolve().parent.parent
ALICE = Scope("alice", "s1")


async def open_memory(path: Path, embedder: FakeEmbedder | None = None) -> HierarchicalMemory:
    return await HierarchicalMemory.create(
        MemoryConfig(db_path=path), embedder=embedder or FakeEmbedder()
    )


async def rows(memory: HierarchicalMemory, user: str = "alice") -> list:
    return await memory.query(
        MemoryFilter(user_id=user, all_scopes=True, include_superseded=True, limit=None)
    )


def add(text: str, **kwargs: object) -> MemoryOps:
    return MemoryOps(add=(AddOp(text, **kwargs),))  # type: ignore[arg-type]


async def test_ops_are_applied_exactly_once(memory: HierarchicalMemory) -> None:
    await memory.start()
    texts = [f"note number {i} topic{i} kiwi{i}" for i in range(25)]
    for i, text in enumerate(texts):
        await memory.submit(add(text, category=MemoryCategory.CONTEXT, importance=0.4),
                            ALICE, request_id=f"req-{i}")
    await memory.drain(timeout=10)
    await memory.drain(timeout=10)  # a second drain applies nothing again

    found = await rows(memory)
    assert sorted(m.content for m in found) == sorted(texts)
    assert {(m.category, m.importance, m.access_count) for m in found} == {
        (MemoryCategory.CONTEXT, 0.4, 0)
    }
    assert {m.metadata.get("source") for m in found} == {"conversation"}
    for m in found:
        events = await memory.get_events(m.id)
        assert [e["op"] for e in events] == ["add"]
        assert events[0]["request_id"].startswith("req-")
    stats = await memory.stats()
    assert (stats["outbox_pending"], stats["vectors"], stats["fts_rows"]) == (0, 25, 25)
    assert memory.writer_stats()["applied"] == 25 and memory.writer_stats()["dropped"] == 0


async def test_submit_is_one_insert_and_nothing_more(
    memory: HierarchicalMemory, fake_embedder: FakeEmbedder
) -> None:
    """Without a worker, submit only queues: no embedding, no row."""
    await memory.submit(add("Queued but not applied"), ALICE)
    assert fake_embedder.calls == []
    assert await rows(memory) == []
    assert (await memory.stats())["outbox_pending"] == 1


async def test_outbox_left_by_a_closed_instance_is_replayed(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    first = await open_memory(path)
    await first.submit(add("Prefers tabs over spaces", scope=ScopeLevel.USER), ALICE)
    await first.submit(add("Working on the billing service", scope=ScopeLevel.SESSION), ALICE)
    await first.close()  # never started the worker

    second = await open_memory(path)
    try:
        assert await rows(second) == []
        await second.start()
        await second.drain(timeout=10)
        found = {m.content: m.scope for m in await rows(second)}
        assert found == {
            "Prefers tabs over spaces": Scope("alice"),
            "Working on the billing service": Scope("alice", "s1"),
        }
        assert (await second.stats())["outbox_pending"] == 0
    finally:
        await second.close()

    third = await open_memory(path)  # and nothing is applied twice
    try:
        await third.start()
        await third.drain(timeout=10)
        assert len(await rows(third)) == 2
    finally:
        await third.close()


@pytest.mark.sqlite_only("a child process opens the SQLite file by its path")
async def test_outbox_left_by_a_crashed_process_is_replayed(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    code = """
        import asyncio, os, sys
        from headroom.memory.hierarchical import HierarchicalMemory
        from headroom.memory.models import AddOp, MemoryConfig, MemoryOps, Scope
        from tests.fakes import FakeEmbedder

        async def main():
            mem = await HierarchicalMemory.create(
                MemoryConfig(db_path=sys.argv[1]), embedder=FakeEmbedder())
            await mem.submit(MemoryOps(add=(AddOp("Survives the crash"),)), Scope("alice"))
            os._exit(0)  # a crash: no worker ran, no close, no drain

        asyncio.run(main())
    """
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", textwrap.dedent(code), str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    mem = await open_memory(path)
    try:
        assert (await mem.stats())["outbox_pending"] == 1
        await mem.start()
        await mem.drain(timeout=10)
        assert [m.content for m in await rows(mem)] == ["Survives the crash"]
    finally:
        await mem.close()


async def test_close_drains_the_queue(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    mem = await open_memory(path)
    await mem.start()
    for i in range(10):
        await mem.submit(add(f"drained note {i} fig{i}"), ALICE)
    await mem.close()
    again = await open_memory(path)
    try:
        assert len(await rows(again)) == 10
        assert (await again.stats())["outbox_pending"] == 0
    finally:
        await again.close()


async def test_failing_embedder_keeps_ops_queued_until_it_recovers(
    memory: HierarchicalMemory, fake_embedder: FakeEmbedder
) -> None:
    fake_embedder.fail_with = EmbedderError("model server down")
    await memory.start()
    await memory.submit(add("Applied after recovery"), ALICE)
    with pytest.raises(TimeoutError):
        await memory.drain(timeout=0.3)
    assert await rows(memory) == []
    assert (await memory.stats())["outbox_pending"] == 1
    assert memory.writer_stats()["retries"] >= 1  # visible to operators (/readyz)

    fake_embedder.fail_with = None
    await memory.drain(timeout=10)
    assert [m.content for m in await rows(memory)] == ["Applied after recovery"]
    assert (await memory.stats())["outbox_pending"] == 0
    assert memory.writer_stats()["applied"] == 1


async def test_update_and_forget_of_own_memories(memory: HierarchicalMemory) -> None:
    job = await memory.add("Works at Google", "alice", "s1")
    pet = await memory.add("Has a hamster", "alice", "s1")
    await memory.start()
    await memory.submit(
        MemoryOps(update=(UpdateOp(job.id, "Works at Anthropic", importance=0.8),),
                  forget=(ForgetOp(pet.id),)),
        ALICE, request_id="req-9",
    )
    await memory.drain(timeout=10)
    current = await memory.query(MemoryFilter(user_id="alice", session_id="s1"))
    assert [(m.content, m.importance, m.supersedes) for m in current] == [
        ("Works at Anthropic", 0.8, job.id)
    ]
    assert (await memory.get(pet.id)).forgotten_at is not None
    assert [e["request_id"] for e in await memory.get_events(pet.id)] == [None, "req-9"]


async def test_ops_on_another_users_memory_are_dropped(memory: HierarchicalMemory) -> None:
    bobs = await memory.add("Bob's bank PIN hint", "bob")
    await memory.start()
    await memory.submit(
        MemoryOps(update=(UpdateOp(bobs.id, "Hijacked by alice"),),
                  forget=(ForgetOp(bobs.id),)),
        ALICE,
    )
    await memory.drain(timeout=10)
    got = await memory.get(bobs.id)
    assert got.is_current and got.content == "Bob's bank PIN hint"
    assert [e["op"] for e in await memory.get_events(bobs.id)] == ["add"]
    assert await rows(memory, "alice") == []
    assert len(await rows(memory, "bob")) == 1
    assert memory.writer_stats()["dropped"] == 2
    assert (await memory.stats())["outbox_pending"] == 0


@pytest.mark.parametrize(
    "bad",
    [
        add("   "),
        add("Importance out of range", importance=1.5),
        MemoryOps(update=(UpdateOp("no-such-id", "Text"),)),
        MemoryOps(forget=(ForgetOp("no-such-id"),)),
    ],
)
async def test_invalid_ops_are_dropped_without_blocking_the_queue(
    memory: HierarchicalMemory, bad: MemoryOps
) -> None:
    await memory.start()
    await memory.submit(bad, ALICE)
    await memory.submit(add("Applied after the bad one"), ALICE)
    await memory.drain(timeout=10)
    assert [m.content for m in await rows(memory)] == ["Applied after the bad one"]
    assert (await memory.stats())["outbox_pending"] == 0


@pytest.mark.parametrize(
    "update",
    [UpdateOp("ID", "   "), UpdateOp("ID", "Importance out of range", importance=7.0)],
)
async def test_invalid_updates_are_dropped(memory: HierarchicalMemory, update: UpdateOp) -> None:
    base = await memory.add("Original fact", "alice", "s1")
    await memory.start()
    bad = UpdateOp(base.id, update.text, importance=update.importance)
    await memory.submit(MemoryOps(update=(bad,)), ALICE)
    await memory.drain(timeout=10)
    assert [(m.content, m.is_current) for m in await rows(memory)] == [("Original fact", True)]


async def test_a_bad_op_does_not_take_good_ops_of_the_same_block_with_it(
    memory: HierarchicalMemory,
) -> None:
    await memory.start()
    await memory.submit(
        MemoryOps(add=(AddOp("Good one"), AddOp(""), AddOp("Good two", importance=0.3)),
                  forget=(ForgetOp("no-such-id"),)),
        ALICE,
    )
    await memory.drain(timeout=10)
    assert sorted(m.content for m in await rows(memory)) == ["Good one", "Good two"]


async def test_ops_apply_in_order(memory: HierarchicalMemory) -> None:
    """An add and, in a later block, an update of it: the queue keeps their order."""
    await memory.start()
    first = await memory.add("Status draft", "alice", "s1")
    for i in range(5):
        await memory.submit(add(f"filler {i} plum{i}"), ALICE)
    await memory.submit(MemoryOps(update=(UpdateOp(first.id, "Status final"),)), ALICE)
    await memory.drain(timeout=10)
    chain = await memory.get_history(first.id)
    assert [m.content for m in chain] == ["Status draft", "Status final"]
