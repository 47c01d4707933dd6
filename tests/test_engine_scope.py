"""Who sees what: the scope-visibility matrix over every read path, and the admin view."""

from __future__ import annotations

import pytest

from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import (
    AddOp,
    MemoryFilter,
    MemoryOps,
    Scope,
    ScopeLevel,
)

# name -> (content, session, agent, turn). Every content shares the word "zebra" (so every read
# path can find every memory) and otherwise differs, so nothing is merged as a duplicate.
PLACES = {
    "U": ("zebra user wide note", None, None, None),
    "S1": ("zebra morning session draft", "s1", None, None),
    "S2": ("zebra evening session sketch", "s2", None, None),
    "A1": ("zebra planner agent memo", "s1", "a1", None),
    "A2": ("zebra coder agent jotting", "s1", "a2", None),
    "T1": ("zebra turn scratch pad", "s1", "a1", "t1"),
    "T2": ("zebra sibling turn remark", "s1", "a1", "t2"),
}

# request scope (session, agent, turn) -> the names visible from it
MATRIX = [
    ((None, None, None), {"U"}),
    (("s1", None, None), {"U", "S1"}),
    (("s2", None, None), {"U", "S2"}),
    (("s1", "a1", None), {"U", "S1", "A1"}),
    (("s1", "a1", "t1"), {"U", "S1", "A1", "T1"}),
    (("s1", "a2", None), {"U", "S1", "A2"}),
    (("s3", None, None), {"U"}),
    (("s2", "a1", "t1"), {"U", "S2"}),
]


@pytest.fixture
async def populated(memory: HierarchicalMemory) -> dict[str, str]:
    """Memories of bob at every level, plus alice's at every level with the same ids."""
    ids: dict[str, str] = {}
    for name, (content, session, agent, turn) in PLACES.items():
        m = await memory.add(content, "bob", session, agent, turn)
        ids[m.id] = name
        other = await memory.add(content + " of alice", "alice", session, agent, turn)
        ids[other.id] = "alice:" + name
    return ids


def _names(ids: dict[str, str], memories: list) -> set[str]:
    return {ids[m.id] for m in memories}


@pytest.mark.parametrize(("request_scope", "expected"), MATRIX)
async def test_every_read_path_sees_exactly_its_scope(
    memory: HierarchicalMemory, populated: dict[str, str],
    request_scope: tuple, expected: set[str],
) -> None:
    s, a, t = request_scope
    query = await memory.query(MemoryFilter(user_id="bob", session_id=s, agent_id=a, turn_id=t))
    search = await memory.search("zebra", "bob", s, a, t, top_k=50)
    text = await memory.text_search("zebra", "bob", s, a, t, top_k=50)
    hybrid = await memory.hybrid_search("zebra", "bob", s, a, t, top_k=50)
    recall = await memory.recall("zebra", "bob", s, a, t, top_k=50, touch=False)

    assert _names(populated, query) == expected
    assert _names(populated, [r.memory for r in search]) == expected
    assert _names(populated, [r.memory for r in text]) == expected
    assert _names(populated, [r.memory for r in hybrid]) == expected
    assert _names(populated, recall) == expected
    assert await memory.count(
        MemoryFilter(user_id="bob", session_id=s, agent_id=a, turn_id=t)
    ) == len(expected)


async def test_search_with_history_keeps_scope(
    memory: HierarchicalMemory, populated: dict[str, str]
) -> None:
    """The as-of / include_superseded path searches stored embeddings, not the index: it must
    apply the same scope pre-filter."""
    results = await memory.search("zebra", "bob", "s1", "a2", top_k=50, include_superseded=True)
    assert _names(populated, [r.memory for r in results]) == {"U", "S1", "A2"}


async def test_other_user_sees_only_their_own(
    memory: HierarchicalMemory, populated: dict[str, str]
) -> None:
    results = await memory.hybrid_search("zebra", "alice", "s1", "a1", "t1", top_k=50)
    assert _names(populated, [r.memory for r in results]) == {
        "alice:U", "alice:S1", "alice:A1", "alice:T1"
    }
    assert await memory.search("zebra", "carol", top_k=50) == []
    assert await memory.text_search("zebra", "carol", top_k=50) == []
    assert await memory.recall("zebra", "carol", top_k=50) == []


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, {"U", "S1", "S2", "A1", "A2", "T1", "T2"}),
        ({"session_id": "s1"}, {"S1", "A1", "A2", "T1", "T2"}),
        ({"session_id": "s1", "agent_id": "a1"}, {"A1", "T1", "T2"}),
        ({"agent_id": "a1"}, {"A1", "T1", "T2"}),
        ({"turn_id": "t1"}, {"T1"}),
        ({"session_id": "s2"}, {"S2"}),
        ({"session_id": "nope"}, set()),
    ],
)
async def test_all_scopes_is_an_equality_filter(
    memory: HierarchicalMemory, populated: dict[str, str], filters: dict, expected: set[str]
) -> None:
    """all_scopes=True: the ids are plain equality filters and unset ones match anything
    (the administrator's "everything this user has"), still never another user's."""
    found = await memory.query(MemoryFilter(user_id="bob", all_scopes=True, **filters))
    assert _names(populated, found) == expected


async def test_memory_scope_level_reported(
    memory: HierarchicalMemory, populated: dict[str, str]
) -> None:
    levels = {
        populated[m.id]: m.scope_level
        for m in await memory.query(MemoryFilter(user_id="bob", all_scopes=True))
    }
    assert levels == {
        "U": ScopeLevel.USER, "S1": ScopeLevel.SESSION, "S2": ScopeLevel.SESSION,
        "A1": ScopeLevel.AGENT, "A2": ScopeLevel.AGENT, "T1": ScopeLevel.TURN,
        "T2": ScopeLevel.TURN,
    }


async def test_categories_filter_combines_with_scope(memory: HierarchicalMemory) -> None:
    pref = await memory.add("zebra likes tea", "bob", "s1", category="preference")
    await memory.add("zebra drinks coffee", "bob", "s2", category="preference")
    await memory.add("zebra works remotely", "bob", "s1", category="fact")
    for results in (
        [r.memory for r in await memory.search("zebra", "bob", "s1", categories=["preference"])],
        [r.memory for r in await memory.text_search("zebra", "bob", "s1",
                                                    categories=["preference"])],
        [r.memory for r in await memory.hybrid_search("zebra", "bob", "s1",
                                                      categories=["preference"])],
        await memory.query(MemoryFilter(user_id="bob", session_id="s1",
                                        categories=["preference"])),
    ):
        assert [m.id for m in results] == [pref.id]


async def test_go_preference_recalled_in_the_afternoon_session(
    memory: HierarchicalMemory,
) -> None:
    """The spec's multi-session example, through the proxy's write path: the model files the
    preference at USER scope in the morning session; the afternoon session recalls it."""
    await memory.start()
    morning = Scope("bob", "morning-session")
    await memory.submit(
        MemoryOps(add=(AddOp("Prefers Go for performance-critical code",
                             scope=ScopeLevel.USER),)),
        morning,
    )
    await memory.submit(
        MemoryOps(add=(AddOp("Debugging a flaky Go test this morning",
                             scope=ScopeLevel.SESSION),)),
        morning,
    )
    await memory.drain(timeout=10)

    recalled = await memory.recall(
        "What language for my new microservice? Go performance", "bob", "afternoon-session"
    )
    assert [m.content for m in recalled] == ["Prefers Go for performance-critical code"]
    assert recalled[0].scope == Scope("bob")
    # The session-scoped note stays in the morning session.
    morning_view = await memory.recall("Go", "bob", "morning-session", top_k=10)
    assert {m.content for m in morning_view} == {
        "Prefers Go for performance-critical code", "Debugging a flaky Go test this morning"
    }
    assert await memory.recall("Go performance", "alice", "afternoon-session") == []


async def test_ops_scope_is_clamped_to_the_request(memory: HierarchicalMemory) -> None:
    """A model asking for AGENT or TURN scope in a request that has only a session gets the
    nearest level the request has."""
    await memory.start()
    await memory.submit(
        MemoryOps(add=(AddOp("zebra clamp agent", scope=ScopeLevel.AGENT),
                       AddOp("zebra clamp turn", scope=ScopeLevel.TURN))),
        Scope("bob", "s1"),
    )
    await memory.drain(timeout=10)
    found = await memory.query(MemoryFilter(user_id="bob", all_scopes=True))
    assert {(m.content, m.scope) for m in found} == {
        ("zebra clamp agent", Scope("bob", "s1")),
        ("zebra clamp turn", Scope("bob", "s1")),
    }
