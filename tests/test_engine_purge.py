"""purge: the hard delete for privacy requests leaves no trace of the user, and counts right."""

from __future__ import annotations

from pathlib import Path

import pytest

from headroom.memory.errors import MemoryNotFoundError
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import MemoryFilter, MemoryOps, Scope, UpdateOp, is_database_url
from tests.backend_rows import user_traces

SECRET = "xylophonist"  # a word only alice's memories contain


def traces(target: str | Path, user: str, word: str | None = None) -> dict[str, int]:
    """What the raw tables still hold of `user` (and of `word` in the text index)."""
    return user_traces(target, user, word)


async def populate(memory: HierarchicalMemory, user: str, word: str) -> dict[str, str]:
    """A user with memories at several scopes, a supersession chain, a forgotten memory,
    reinforcement and promotion events, and a pending outbox entry."""
    ids = {}
    ids["user"] = (await memory.add(f"{word} plays in an orchestra", user)).id
    ids["s1"] = (await memory.add(f"{word} practising scales today", user, "s1")).id
    ids["s1a1"] = (await memory.add(f"{word} tuning notes agent", user, "s1", "a1")).id
    ids["s2"] = (await memory.add(f"{word} concert next friday", user, "s2")).id
    old = await memory.add(f"{word} owns a wooden instrument", user, "s1")
    ids["old"] = old.id
    ids["new"] = (await memory.supersede(old.id, f"{word} owns a metal instrument")).id
    gone = await memory.add(f"{word} dislikes brass bands", user)
    await memory.forget(gone.id)
    ids["gone"] = gone.id
    await memory.add(f"{word} plays in an orchestra", user, "s2")  # reinforce
    await memory.get(ids["user"])  # cached
    # queued but not applied (no worker started): one for s1, one for s2
    await memory.submit(MemoryOps(update=(UpdateOp(ids["s1"], f"{word} s1 pending"),)),
                        Scope(user, "s1"))
    await memory.submit(MemoryOps(update=(UpdateOp(ids["s2"], f"{word} s2 pending"),)),
                        Scope(user, "s2"))
    return ids


def db_path(memory: HierarchicalMemory) -> str | Path:
    """The engine's database: a file, or on conftest's PostgreSQL leg its schema's URL."""
    target = memory.config.db_path
    return target if is_database_url(target) else Path(str(target))


async def test_purge_user_leaves_no_trace(memory: HierarchicalMemory) -> None:
    path = db_path(memory)
    await populate(memory, "alice", SECRET)
    bob = await populate(memory, "bob", "trombonist")
    alice_before = traces(path, "alice", SECRET)
    bob_before = traces(path, "bob", "trombonist")
    assert alice_before == {
        "memories": 7, "events": 10, "outbox": 2, "vectors": 5, "fts": 5,
        "fts_word": 5, "content": 7,
    }
    # PostgreSQL's replica cache keeps no copy of an id changed in the last 2 s (another
    # replica's notice may still be on its way), so only SQLite's is sure to hold one.
    cached = (await memory.stats())["cache_size"]
    assert cached >= (0 if is_database_url(path) else 1)

    counts = await memory.purge("alice")

    assert {k: v for k, v in counts.items() if k != "cache"} == {
        "memories": 7, "events": 10, "outbox": 2, "vectors": 5, "fts": 5,
    }
    assert counts["cache"] == cached  # the cached copies were dropped
    assert traces(path, "alice", SECRET) == dict.fromkeys(alice_before, 0)
    assert traces(path, "bob", "trombonist") == bob_before
    # the engine agrees
    assert await memory.query(MemoryFilter(user_id="alice", all_scopes=True,
                                           include_superseded=True)) == []
    assert await memory.search(SECRET, "alice") == []
    assert await memory.text_search(SECRET, "alice") == []
    assert await memory.recall(SECRET, "alice") == []
    stats = await memory.stats("alice")
    assert (stats["rows"], stats["vectors"], stats["fts_rows"]) == (0, 0, 0)
    # bob's memories are all still readable, his cached one included
    assert (await memory.get(bob["user"])).user_id == "bob"
    assert len(await memory.query(MemoryFilter(user_id="bob", all_scopes=True))) == 5
    assert len(await memory.text_search("trombonist", "bob", "s1", "a1", top_k=50)) == 4
    assert len(await memory.search("trombonist orchestra", "bob", "s1", "a1", top_k=50)) == 4


async def test_purged_ids_are_gone_even_from_the_cache(memory: HierarchicalMemory) -> None:
    ids = await populate(memory, "alice", SECRET)
    await memory.get(ids["s1"])
    await memory.purge("alice")
    for memory_id in ids.values():
        with pytest.raises(MemoryNotFoundError):
            await memory.get(memory_id)


@pytest.mark.sqlite_only("reads the SQLite file's bytes (PostgreSQL: VACUUM in checkpoint)")
async def test_purge_leaves_no_bytes_in_the_file(memory: HierarchicalMemory) -> None:
    """Not only the rows: the FTS index's pages and the freed pages no longer hold the words."""
    path = db_path(memory)
    await populate(memory, "alice", SECRET)
    await populate(memory, "bob", "trombonist")
    await memory.purge("alice")
    files = [path, path.with_name(path.name + "-wal")]
    data = b"".join(p.read_bytes() for p in files if p.exists())
    assert SECRET.encode() not in data
    assert b"trombonist" in data


async def test_purged_outbox_entries_are_not_replayed(memory: HierarchicalMemory) -> None:
    ids = await populate(memory, "alice", SECRET)
    await memory.purge("alice")
    await memory.start()
    await memory.drain(timeout=10)
    assert traces(db_path(memory), "alice") == dict.fromkeys(
        ("memories", "events", "outbox", "vectors", "fts"), 0
    )
    with pytest.raises(MemoryNotFoundError):
        await memory.get(ids["s1"])


async def test_purge_one_session(memory: HierarchicalMemory) -> None:
    path = db_path(memory)
    ids = await populate(memory, "alice", SECRET)
    await populate(memory, "bob", "trombonist")
    bob_before = traces(path, "bob", "trombonist")

    counts = await memory.purge("alice", session_id="s1")

    # s1, s1a1, old, new; their events (add x4 + supersede); the s1 outbox entry
    assert {k: counts[k] for k in ("memories", "events", "outbox", "vectors", "fts")} == {
        "memories": 4, "events": 5, "outbox": 1, "vectors": 3, "fts": 3,
    }
    left = await memory.query(
        MemoryFilter(user_id="alice", all_scopes=True, include_superseded=True)
    )
    assert {m.id for m in left} == {ids["user"], ids["s2"], ids["gone"]}
    assert traces(path, "alice", SECRET) == {
        "memories": 3, "events": 5, "outbox": 1, "vectors": 2, "fts": 2,
        "fts_word": 2, "content": 3,
    }
    assert traces(path, "bob", "trombonist") == bob_before
    for key in ("s1", "s1a1", "old", "new"):
        with pytest.raises(MemoryNotFoundError):
            await memory.get(ids[key])
    assert [r.memory.id for r in await memory.text_search(SECRET, "alice", "s1", top_k=50)] \
        == [ids["user"]]


async def test_purge_one_agent(memory: HierarchicalMemory) -> None:
    ids = await populate(memory, "alice", SECRET)
    counts = await memory.purge("alice", session_id="s1", agent_id="a1")
    assert counts["memories"] == 1 and counts["vectors"] == 1
    with pytest.raises(MemoryNotFoundError):
        await memory.get(ids["s1a1"])
    assert (await memory.get(ids["s1"])).is_current


async def test_purge_of_an_unknown_user_counts_zero(memory: HierarchicalMemory) -> None:
    await populate(memory, "bob", "trombonist")
    counts = await memory.purge("nobody")
    assert {k: v for k, v in counts.items() if k != "cache"} == {
        "memories": 0, "events": 0, "outbox": 0, "vectors": 0, "fts": 0
    }
    assert (await memory.stats("bob"))["rows"] == 7


async def test_clear_everyone(memory: HierarchicalMemory) -> None:
    await populate(memory, "alice", SECRET)
    await populate(memory, "bob", "trombonist")
    counts = await memory.clear()
    assert counts["memories"] == 14
    stats = await memory.stats()
    assert (stats["rows"], stats["vectors"], stats["fts_rows"], stats["outbox_pending"]) == (
        0, 0, 0, 0
    )
