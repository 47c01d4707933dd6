"""stats(): totals by scope, category and user; current vs superseded vs forgotten."""

from __future__ import annotations

from headroom.memory.hierarchical import HierarchicalMemory


async def populate(memory: HierarchicalMemory) -> None:
    await memory.add("Works at a bank", "alice", category="fact")
    await memory.add("Prefers short answers", "alice", "s1", category="preference")
    await memory.add("Planning a trip to Lisbon", "alice", "s1", "a1", category="context")
    await memory.add("Tends to ask follow-ups", "alice", "s1", "a1", "t1", category="insight")
    old = await memory.add("Drives a Fiat", "alice", category="entity")
    await memory.supersede(old.id, "Drives a Volvo")
    gone = await memory.add("Has a hamster", "alice", "s2", category="entity")
    await memory.forget(gone.id)
    await memory.add("Chose Postgres", "bob", "s9", category="decision")
    await memory.add("Likes jazz", "bob", category="preference")


async def test_stats_for_everyone(memory: HierarchicalMemory) -> None:
    await populate(memory)
    stats = await memory.stats()
    assert (stats["total"], stats["current"], stats["superseded"], stats["forgotten"],
            stats["rows"]) == (7, 7, 1, 1, 9)
    assert stats["scopes"] == {"user": 3, "session": 2, "agent": 1, "turn": 1}
    assert stats["categories"] == {
        "fact": 1, "preference": 2, "context": 1, "insight": 1, "entity": 1, "decision": 1,
    }
    assert stats["users"] == {"alice": 5, "bob": 2}
    assert (stats["vectors"], stats["fts_rows"]) == (7, 7)
    assert stats["embedding_model"] == "fake:bow-64"
    assert stats["outbox_pending"] == 0
    assert stats["db_bytes"] > 0


async def test_stats_for_one_user(memory: HierarchicalMemory) -> None:
    await populate(memory)
    alice = await memory.stats("alice")
    assert (alice["total"], alice["superseded"], alice["forgotten"], alice["rows"]) == (
        5, 1, 1, 7
    )
    assert alice["scopes"] == {"user": 2, "session": 1, "agent": 1, "turn": 1}
    assert alice["categories"] == {
        "fact": 1, "preference": 1, "context": 1, "insight": 1, "entity": 1
    }
    assert alice["users"] == {"alice": 5}
    assert (alice["vectors"], alice["fts_rows"]) == (5, 5)
    bob = await memory.stats("bob")
    assert (bob["total"], bob["rows"], bob["scopes"]["session"]) == (2, 2, 1)
    nobody = await memory.stats("nobody")
    assert (nobody["total"], nobody["rows"], nobody["categories"]) == (0, 0, {})


async def test_stats_follow_changes(memory: HierarchicalMemory) -> None:
    m = await memory.add("Prefers short answers", "alice", "s1", category="preference")
    await memory.add("Prefers short answers", "alice", "s2")  # promoted to USER
    stats = await memory.stats("alice")
    assert stats["scopes"] == {"user": 1, "session": 0, "agent": 0, "turn": 0}
    await memory.supersede(m.id, "Prefers long answers", category="insight")
    stats = await memory.stats("alice")
    assert stats["categories"] == {"insight": 1}
    assert (stats["current"], stats["superseded"]) == (1, 1)
    await memory.purge("alice")
    stats = await memory.stats("alice")
    assert (stats["rows"], stats["vectors"], stats["fts_rows"]) == (0, 0, 0)
