"""The same fact twice reinforces one memory; durable memories bubble up to USER scope."""

from __future__ import annotations

from pathlib import Path

import pytest

from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import MemoryConfig, MemoryFilter, Scope, ScopeLevel
from tests.fakes import FakeEmbedder


async def _all(memory: HierarchicalMemory, user: str = "alice") -> list:
    return await memory.query(
        MemoryFilter(user_id=user, all_scopes=True, include_superseded=True)
    )


async def test_exact_duplicate_reinforces(memory: HierarchicalMemory) -> None:
    first = await memory.add("Likes green tea", "alice", importance=0.4)
    second = await memory.add("Likes green tea", "alice", importance=0.6)
    third = await memory.add("Likes green tea", "alice", importance=0.2)
    assert first.id == second.id == third.id
    rows = await _all(memory)
    assert len(rows) == 1
    assert rows[0].access_count == 2
    assert rows[0].importance == 0.6  # the max, never lowered
    assert rows[0].last_accessed is not None
    events = await memory.get_events(first.id)
    assert [e["op"] for e in events] == ["add", "reinforce", "reinforce"]
    stats = await memory.stats("alice")
    assert (stats["rows"], stats["vectors"], stats["fts_rows"]) == (1, 1, 1)


@pytest.mark.parametrize(
    "variant",
    ["likes green tea", "LIKES GREEN TEA.", "  Likes   green\ttea!  ", "Likes green tea."],
)
async def test_case_space_and_punctuation_variants_are_the_same_fact(
    memory: HierarchicalMemory, variant: str
) -> None:
    first = await memory.add("Likes green tea", "alice")
    again = await memory.add(variant, "alice")
    assert again.id == first.id
    assert again.content == "Likes green tea"  # the original wording is kept
    assert len(await _all(memory)) == 1


async def test_near_identical_by_embedding_reinforces(memory: HierarchicalMemory) -> None:
    """Same words in another order: not the same text, but the same vector (FakeEmbedder is a
    bag of words), so the embedding check catches it."""
    first = await memory.add("green tea is liked", "alice")
    again = await memory.add("liked is green tea", "alice")
    assert again.id == first.id
    assert len(await _all(memory)) == 1


async def test_related_but_different_facts_stay_apart(memory: HierarchicalMemory) -> None:
    a = await memory.add("Likes green tea", "alice")
    b = await memory.add("Likes green tea with honey", "alice")
    assert a.id != b.id
    assert len(await _all(memory)) == 2


async def test_dedup_threshold_changes_behaviour(tmp_path: Path) -> None:
    """cos("Likes green tea", "Likes green tea with honey") = 3/sqrt(15) ≈ 0.77 for the fake."""
    config = MemoryConfig(db_path=tmp_path / "m.db", dedup_threshold=0.7)
    async with await HierarchicalMemory.create(config, embedder=FakeEmbedder()) as memory:
        a = await memory.add("Likes green tea", "alice")
        b = await memory.add("Likes green tea with honey", "alice")
        assert a.id == b.id
        assert len(await _all(memory)) == 1


async def test_dedup_false_adds_a_second_row(memory: HierarchicalMemory) -> None:
    a = await memory.add("Likes green tea", "alice")
    b = await memory.add("Likes green tea", "alice", dedup=False)
    assert a.id != b.id
    assert len(await _all(memory)) == 2
    assert (await memory.get(a.id)).access_count == 0


async def test_dedup_is_per_user(memory: HierarchicalMemory) -> None:
    a = await memory.add("Likes green tea", "alice")
    b = await memory.add("Likes green tea", "bob")
    assert a.id != b.id
    assert (await memory.get(a.id)).access_count == 0
    assert len(await _all(memory, "bob")) == 1


async def test_restated_in_another_session_promotes_to_user(memory: HierarchicalMemory) -> None:
    first = await memory.add("Prefers Go for services", "alice", "morning", importance=0.5)
    assert first.scope_level is ScopeLevel.SESSION
    # not visible from another session yet
    assert await memory.recall("Go services", "alice", "afternoon") == []

    again = await memory.add("prefers go for services", "alice", "afternoon")
    assert again.id == first.id
    assert again.scope == Scope("alice")
    rows = await _all(memory)
    assert [(r.id, r.scope_level) for r in rows] == [(first.id, ScopeLevel.USER)]
    # moved, not copied: every read path sees it from a third session
    assert [m.id for m in await memory.recall("Go services", "alice", "evening")] == [first.id]
    assert [r.memory.id for r in await memory.search("Go services", "alice", "evening")] == [
        first.id
    ]
    assert [r.memory.id for r in await memory.text_search("Go", "alice", "evening")] == [
        first.id
    ]
    events = await memory.get_events(first.id)
    assert [e["op"] for e in events] == ["add", "promote", "reinforce"]
    promote = events[1]
    assert promote["old"]["session_id"] == "morning" and promote["old"]["level"] == "session"
    assert promote["new"]["session_id"] is None and promote["new"]["level"] == "user"
    stats = await memory.stats("alice")
    assert stats["scopes"] == {"user": 1, "session": 0, "agent": 0, "turn": 0}
    assert (stats["vectors"], stats["fts_rows"]) == (1, 1)


async def test_restated_by_another_agent_promotes_to_their_common_session(
    memory: HierarchicalMemory,
) -> None:
    first = await memory.add("Repo uses pytest", "alice", "s1", "planner")
    again = await memory.add("Repo uses pytest", "alice", "s1", "coder")
    assert again.id == first.id and again.scope == Scope("alice", "s1")
    assert [m.id for m in await memory.recall("pytest", "alice", "s1", "reviewer")] == [first.id]
    assert await memory.recall("pytest", "alice", "s2") == []


async def test_restated_in_the_same_scope_does_not_move(memory: HierarchicalMemory) -> None:
    first = await memory.add("Repo uses pytest", "alice", "s1", "planner")
    await memory.add("Repo uses pytest", "alice", "s1", "planner")
    got = await memory.get(first.id)
    assert got.scope == Scope("alice", "s1", "planner")
    assert [e["op"] for e in await memory.get_events(first.id)] == ["add", "reinforce"]


async def test_important_session_memory_bubbles_to_user(memory: HierarchicalMemory) -> None:
    threshold = memory.config.bubble_importance_threshold
    assert threshold == 0.85
    high = await memory.add("Allergic to peanuts", "alice", "s1", "a1", importance=threshold)
    low = await memory.add("Wants a short answer", "alice", "s1", importance=0.84)
    assert high.scope == Scope("alice") and low.scope == Scope("alice", "s1")
    assert [e["op"] for e in await memory.get_events(high.id)] == ["add", "promote"]
    promote = (await memory.get_events(high.id))[1]
    assert promote["old"]["agent_id"] == "a1" and promote["new"]["level"] == "user"
    assert [m.id for m in await memory.recall("peanuts", "alice", "s9")] == [high.id]


async def test_reinforcing_past_the_threshold_bubbles(memory: HierarchicalMemory) -> None:
    """Importance that reaches the bubbling threshold through reinforcement promotes too."""
    first = await memory.add("Allergic to peanuts", "alice", "s1", importance=0.5)
    again = await memory.add("Allergic to peanuts", "alice", "s1", importance=0.9)
    assert again.id == first.id
    assert again.importance == 0.9
    assert again.scope == Scope("alice")
    assert [m.id for m in await memory.recall("peanuts", "alice", "s2")] == [first.id]
    assert "promote" in [e["op"] for e in await memory.get_events(first.id)]


async def test_bubbling_can_be_turned_off(tmp_path: Path) -> None:
    config = MemoryConfig(db_path=tmp_path / "m.db", bubble_importance_threshold=None)
    async with await HierarchicalMemory.create(config, embedder=FakeEmbedder()) as memory:
        m = await memory.add("Allergic to peanuts", "alice", "s1", importance=1.0)
        assert m.scope == Scope("alice", "s1")
        assert await memory.recall("peanuts", "alice", "s2") == []


async def test_near_duplicate_with_the_real_model(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """MiniLM puts a paraphrase with the same words well above the 0.95 threshold."""
    try:
        embedder = request.getfixturevalue("local_embedder")
    except pytest.FixtureLookupError:
        pytest.skip("no local_embedder fixture (memory/embedders not available)")
    config = MemoryConfig(db_path=tmp_path / "m.db")
    async with await HierarchicalMemory.create(config, embedder=embedder) as memory:
        first = await memory.add("The user prefers Python for backend work", "alice")
        again = await memory.add("The user prefers Python for backend work!!", "alice", "s2")
        near = await memory.add("the user prefers python for the backend work", "alice")
        other = await memory.add("The user's cat is named Whiskers", "alice")
        assert again.id == first.id and near.id == first.id
        assert other.id != first.id
        rows = await _all(memory)
        assert len(rows) == 2
