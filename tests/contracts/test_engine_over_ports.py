"""The engine, wired by hand from each storage family in tests/contracts/backends.py: the same
story (add, dedup, isolation, supersede, history, forget, search, recall, purge with counts) must
come out the same whichever backend holds the data, since the engine may only use what the ports
promise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from headroom.memory.adapters import LRUMemoryCache
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import MemoryCategory, MemoryConfig, MemoryFilter
from tests.contracts.backends import STORAGE
from tests.fakes import FakeEmbedder

DIMENSION = 64


@pytest.fixture(params=sorted(STORAGE))
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[HierarchicalMemory]:
    embedder = FakeEmbedder(DIMENSION)
    storage = STORAGE[request.param](request, DIMENSION)
    mem = HierarchicalMemory(
        storage.store, storage.vectors, storage.text, embedder, LRUMemoryCache(100),
        config=MemoryConfig(db_path=request.getfixturevalue("tmp_path") / "unused.db"),
        on_close=storage.close,
    )
    try:
        yield mem
    finally:
        await mem.close()


async def test_add_dedup_and_isolation(engine: HierarchicalMemory) -> None:
    first = await engine.add("Prefers green tea in the morning", "alice",
                             category=MemoryCategory.PREFERENCE)
    again = await engine.add("prefers green tea in the morning.", "alice")
    assert again.id == first.id  # restated: reinforced, not a second row
    bob = await engine.add("Prefers green tea in the morning", "bob")
    assert bob.id != first.id
    await engine.add("Owns a red bicycle", "alice")
    hits = await engine.search("green tea", "alice", top_k=10)
    assert [r.memory.user_id for r in hits] == ["alice"] * len(hits)
    assert first.id in [r.memory.id for r in hits]
    text_hits = await engine.text_search("bicycle", "alice")
    assert [r.memory.content for r in text_hits] == ["Owns a red bicycle"]
    assert await engine.count(MemoryFilter(user_id="alice")) == 2
    assert await engine.count(MemoryFilter(user_id="bob")) == 1


async def test_supersede_history_and_forget(engine: HierarchicalMemory) -> None:
    orig = await engine.add("Works at Google as an engineer", "alice")
    new = await engine.supersede(orig.id, "Works at Anthropic as an engineer")
    current = await engine.query(MemoryFilter(user_id="alice"))
    assert [m.id for m in current] == [new.id]
    history = await engine.get_history(new.id)
    assert [(m.id, m.is_current) for m in history] == [(orig.id, False), (new.id, True)]
    assert [r.memory.id for r in await engine.text_search("engineer", "alice")] == [new.id]
    as_of = await engine.query(MemoryFilter(user_id="alice", as_of=orig.valid_from))
    assert [m.id for m in as_of] == [orig.id]

    await engine.forget(new.id, user_id="alice")
    assert await engine.query(MemoryFilter(user_id="alice")) == []
    assert await engine.search("engineer Anthropic", "alice") == []
    assert await engine.recall("where does the engineer work", "alice") == []
    ops = [e["op"] for e in await engine.get_events(new.id)]
    assert ops[0] == "add" and ops[-1] == "forget"


async def test_recall_sees_the_request_scope_only(engine: HierarchicalMemory) -> None:
    await engine.add("Likes hiking in the Alps", "alice")
    await engine.add("Planning a hiking trip for this session", "alice", session_id="s1")
    await engine.add("Hiking boots need new laces", "alice", session_id="s2")
    await engine.add("Hiking with Bob's dog", "bob")
    recalled = await engine.recall("hiking", "alice", "s1", top_k=10)
    assert sorted(m.content for m in recalled) == [
        "Likes hiking in the Alps", "Planning a hiking trip for this session",
    ]


async def test_purge_counts_what_it_removes(engine: HierarchicalMemory) -> None:
    orig = await engine.add("Lives in Berlin", "alice")
    await engine.supersede(orig.id, "Lives in Lisbon")
    await engine.add("Has two cats", "alice", session_id="s1")
    await engine.add("Bob's fact", "bob")
    await engine.get(orig.id)  # cached
    counts = await engine.purge("alice")
    assert counts["memories"] == 3
    assert counts["vectors"] == 2 and counts["fts"] == 2  # the current ones were indexed
    assert counts["events"] >= 3
    assert await engine.query(MemoryFilter(user_id="alice", include_superseded=True)) == []
    stats = await engine.stats()
    assert (stats["rows"], stats["vectors"], stats["fts_rows"]) == (1, 1, 1)
    assert stats["users"] == {"bob": 1}
