"""Time: supersession and forgetting leave every current read path, history stays readable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from headroom.memory.errors import MemoryNotFoundError, SupersededError, ValidationError
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import MemoryCategory, MemoryFilter

T0 = datetime(2024, 1, 1, tzinfo=UTC)
T1 = datetime(2024, 6, 1, tzinfo=UTC)
T2 = datetime(2025, 1, 1, tzinfo=UTC)


async def _current_everywhere(memory: HierarchicalMemory, query: str, user: str = "alice"):
    """The ids each current read path returns for `query`."""
    return {
        "query": {m.id for m in await memory.query(MemoryFilter(user_id=user))},
        "search": {r.memory.id for r in await memory.search(query, user, top_k=50)},
        "text": {r.memory.id for r in await memory.text_search(query, user, top_k=50)},
        "hybrid": {r.memory.id for r in await memory.hybrid_search(query, user, top_k=50)},
        "recall": {m.id for m in await memory.recall(query, user, top_k=50, touch=False)},
    }


async def test_superseded_memory_leaves_every_current_read_path(
    memory: HierarchicalMemory,
) -> None:
    orig = await memory.add("User works at Google", "alice", category=MemoryCategory.FACT)
    # Warm the cache with the current version, so a stale cached copy would show.
    assert (await memory.get(orig.id)).is_current
    new = await memory.supersede(orig.id, "User now works at Anthropic")

    seen = await _current_everywhere(memory, "works at Google Anthropic")
    assert seen == {k: {new.id} for k in seen}

    old = await memory.get(orig.id)
    assert old.is_current is False
    assert old.superseded_by == new.id
    assert old.valid_until is not None
    assert new.supersedes == orig.id and new.is_current
    # the new memory inherits what it was not told to change
    assert new.category is MemoryCategory.FACT and new.user_id == "alice"

    stats = await memory.stats("alice")
    assert (stats["current"], stats["superseded"], stats["vectors"], stats["fts_rows"]) == (
        1, 1, 1, 1
    )


async def test_include_superseded_and_history_chain(memory: HierarchicalMemory) -> None:
    a = await memory.add("Lives in Berlin", "alice", valid_from=T0)
    b = await memory.supersede(a.id, "Lives in Paris", at=T1)
    c = await memory.supersede(b.id, "Lives in Lisbon", at=T2)

    everything = await memory.query(MemoryFilter(user_id="alice", include_superseded=True))
    assert {m.id for m in everything} == {a.id, b.id, c.id}
    found = await memory.search("Lives in", "alice", include_superseded=True, top_k=10)
    assert {r.memory.id for r in found} == {a.id, b.id, c.id}

    for member in (a, b, c):
        chain = await memory.get_history(member.id)
        assert [m.content for m in chain] == ["Lives in Berlin", "Lives in Paris",
                                              "Lives in Lisbon"]
        assert [(m.valid_from, m.valid_until) for m in chain] == [(T0, T1), (T1, T2), (T2, None)]
        assert [m.is_current for m in chain] == [False, False, True]
        assert [(m.supersedes, m.superseded_by) for m in chain] == [
            (None, b.id), (a.id, c.id), (b.id, None)
        ]


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        (T0 - timedelta(days=1), set()),
        (T0, {"Lives in Berlin"}),
        (T1 - timedelta(microseconds=1), {"Lives in Berlin"}),
        (T1, {"Lives in Paris"}),
        (T1 + timedelta(days=30), {"Lives in Paris"}),
        (T2 + timedelta(days=1), {"Lives in Lisbon"}),
    ],
)
async def test_as_of_returns_the_state_at_that_time(
    memory: HierarchicalMemory, when: datetime, expected: set[str]
) -> None:
    a = await memory.add("Lives in Berlin", "alice", valid_from=T0)
    b = await memory.supersede(a.id, "Lives in Paris", at=T1)
    await memory.supersede(b.id, "Lives in Lisbon", at=T2)
    await memory.add("Lives in Madrid", "bob", valid_from=T0)

    state = await memory.query(MemoryFilter(user_id="alice", as_of=when))
    assert {m.content for m in state} == expected
    results = await memory.search("Lives in", "alice", as_of=when, top_k=10)
    assert {r.memory.content for r in results} == expected


async def test_as_of_accepts_naive_datetimes_as_utc(memory: HierarchicalMemory) -> None:
    a = await memory.add("Lives in Berlin", "alice", valid_from=T0)
    await memory.supersede(a.id, "Lives in Paris", at=T1)
    naive = datetime(2024, 3, 1)
    state = await memory.query(MemoryFilter(user_id="alice", as_of=naive))
    assert [m.content for m in state] == ["Lives in Berlin"]


async def test_supersede_of_a_superseded_memory_is_refused(memory: HierarchicalMemory) -> None:
    a = await memory.add("Drives a Fiat", "alice")
    b = await memory.supersede(a.id, "Drives a Volvo")
    with pytest.raises(SupersededError) as info:
        await memory.supersede(a.id, "Drives a Saab")
    assert info.value.superseded_by == b.id
    assert b.id in str(info.value)
    # nothing was written by the refused call
    rows = await memory.query(MemoryFilter(user_id="alice", include_superseded=True))
    assert {m.content for m in rows} == {"Drives a Fiat", "Drives a Volvo"}


async def test_supersede_checks_the_user(memory: HierarchicalMemory) -> None:
    a = await memory.add("Drives a Fiat", "alice")
    with pytest.raises(MemoryNotFoundError):
        await memory.supersede(a.id, "Drives a Volvo", user_id="mallory")
    assert (await memory.get(a.id)).is_current


async def test_forget_is_soft(memory: HierarchicalMemory) -> None:
    keep = await memory.add("Has a cat named Tom", "alice")
    gone = await memory.add("Has a dog named Rex", "alice")
    forgotten = await memory.forget(gone.id, reason="user asked")

    assert forgotten.forgotten_at is not None and not forgotten.is_current
    seen = await _current_everywhere(memory, "Has a named dog cat")
    assert seen == {k: {keep.id} for k in seen}

    row = await memory.get(gone.id)
    assert row.forgotten_at is not None and row.valid_until == row.forgotten_at
    assert [m.id for m in await memory.get_history(gone.id)] == [gone.id]
    events = await memory.get_events(gone.id)
    assert [e["op"] for e in events] == ["add", "forget"]
    assert events[-1]["new"] == {"reason": "user asked"}
    history = await memory.query(MemoryFilter(user_id="alice", include_superseded=True))
    assert {m.id for m in history} == {keep.id, gone.id}
    # as of before the forget, it was there
    before = await memory.query(MemoryFilter(user_id="alice", as_of=forgotten.forgotten_at
                                             - timedelta(microseconds=1)))
    assert {m.id for m in before} == {keep.id, gone.id}

    stats = await memory.stats("alice")
    assert (stats["current"], stats["superseded"], stats["forgotten"], stats["rows"]) == (
        1, 0, 1, 2
    )


async def test_forget_twice_and_forget_unknown(memory: HierarchicalMemory) -> None:
    m = await memory.add("Has a dog named Rex", "alice")
    await memory.forget(m.id)
    with pytest.raises(SupersededError, match="forgotten"):
        await memory.forget(m.id)
    with pytest.raises(SupersededError, match="forgotten"):
        await memory.supersede(m.id, "Has a dog named Max")
    with pytest.raises(MemoryNotFoundError, match="no-such-id"):
        await memory.forget("no-such-id")
    with pytest.raises(MemoryNotFoundError):
        await memory.forget(m.id, user_id="bob")


async def test_forget_of_a_superseded_memory_is_refused(memory: HierarchicalMemory) -> None:
    a = await memory.add("Drives a Fiat", "alice")
    await memory.supersede(a.id, "Drives a Volvo")
    with pytest.raises(SupersededError):
        await memory.forget(a.id)


async def test_supersede_events_are_recorded(memory: HierarchicalMemory) -> None:
    a = await memory.add("Drives a Fiat", "alice", valid_from=T0)
    b = await memory.supersede(a.id, "Drives a Volvo", request_id="req-7", at=T2)
    events = await memory.get_events(a.id)
    assert [e["op"] for e in events] == ["add", "supersede"]
    sup = events[-1]
    assert sup["request_id"] == "req-7" and sup["at"] == T2
    assert sup["new"] == {"id": b.id, "content": "Drives a Volvo"}
    assert sup["old"] == {"content": "Drives a Fiat"}


async def test_supersede_overrides(memory: HierarchicalMemory) -> None:
    a = await memory.add(
        "Likes jazz", "alice", "s1", category="preference", importance=0.4,
        entity_refs=["jazz"], metadata={"src": "chat"},
    )
    b = await memory.supersede(
        a.id, "Likes techno", category="insight", importance=0.7, entity_refs=["techno"],
        metadata={"src": "review"},
    )
    got = await memory.get(b.id)
    assert (got.category, got.importance, got.entity_refs, got.metadata) == (
        MemoryCategory.INSIGHT, 0.7, ["techno"], {"src": "review"}
    )
    assert got.scope == a.scope  # stays where the old one was
    inherited = await memory.supersede(b.id, "Likes house")
    again = await memory.get(inherited.id)
    assert (again.category, again.importance, again.entity_refs, again.metadata) == (
        MemoryCategory.INSIGHT, 0.7, ["techno"], {"src": "review"}
    )


async def test_superseded_content_can_be_added_again(memory: HierarchicalMemory) -> None:
    """Dedup compares with current memories only: re-stating an old fact makes a new row."""
    a = await memory.add("Lives in Berlin", "alice")
    await memory.supersede(a.id, "Lives in Paris")
    again = await memory.add("Lives in Berlin", "alice")
    assert again.id != a.id and again.is_current
    assert {m.content for m in await memory.query(MemoryFilter(user_id="alice"))} == {
        "Lives in Berlin", "Lives in Paris"
    }


async def test_supersede_before_the_memory_began_is_refused(memory: HierarchicalMemory) -> None:
    """An explicit `at` earlier than the old memory's valid_from would end it before it began."""
    a = await memory.add("Lives in Berlin", "alice", valid_from=T1)
    with pytest.raises(ValidationError, match="valid only from"):
        await memory.supersede(a.id, "Lives in Paris", at=T0)
    assert (await memory.get(a.id)).is_current
    assert len(await memory.query(MemoryFilter(user_id="alice", include_superseded=True))) == 1
    same_instant = await memory.supersede(a.id, "Lives in Paris", at=T1)
    assert same_instant.valid_from == T1
