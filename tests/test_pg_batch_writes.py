"""PostgreSQL's batched write path gives what one write after another gives: `add_many` runs a
batch's dedup lookups per round (at most one op per user), a round's rows go as one statement
per table, and the candidates of a search come back in one columnar read."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pytest

from headroom.memory.adapters.postgres import PgDatabase, PgVectorIndex
from headroom.memory.candidates import CandidateRows
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import (
    Memory,
    MemoryCategory,
    MemoryConfig,
    MemoryDraft,
    MemoryFilter,
)
from headroom.memory.unit_of_work import _rounds
from tests.fakes import FakeEmbedder
from tests.pg import (  # noqa: F401 (fixtures)
    fresh_schema,
    pg_database,
    pg_db,
    pg_schema_url,
    pg_server,
)

# Long enough that one changed number keeps the bag-of-words cosine past dedup_threshold.
CATS = ("at home in the small blue house by the old harbour where the fishing boats come in"
        " every single morning before the sun rises over the hills")
# A batch whose users repeat: exact repeats, a near-identical restatement, a changed fact (a new
# number supersedes), and the same text for two users (never one user's dedup of the other's).
BATCH = [
    ("alice", "I live in Lisbon near the river"),
    ("bob", "I live in Lisbon near the river"),
    ("alice", "My favourite colour is green"),
    ("alice", "I live in Lisbon near the river"),
    ("carol", f"I have 2 cats {CATS}"),
    ("bob", "I live in Lisbon, near the river!"),
    ("carol", f"I have 3 cats {CATS}"),
    ("alice", "my favourite colour is green"),
    ("dave", "I play chess on Sundays"),
    ("dave", "I play chess on Sundays"),  # dedup off (below): stored twice
]
NO_DEDUP = {len(BATCH) - 1}


def _drafts() -> list[MemoryDraft]:
    return [MemoryDraft(text, user, session_id="s1", dedup=i not in NO_DEDUP)
            for i, (user, text) in enumerate(BATCH)]


@pytest.fixture
def second_schema_url(pg_database: str) -> Iterator[str]:  # noqa: F811
    with fresh_schema(pg_database) as url:
        yield url


async def _versions(mem: HierarchicalMemory, user: str) -> list[Memory]:
    flt = MemoryFilter(user_id=user, all_scopes=True, include_superseded=True, limit=None)
    return sorted(await mem.query(flt), key=lambda m: m.created_at)


async def _state(mem: HierarchicalMemory, users: list[str]) -> list[tuple[object, ...]]:
    """What a user can tell about their memories: every version's text, whether current, the
    supersession links (by text), access counts and the audit trail's ops."""
    out: list[tuple[object, ...]] = []
    for user in users:
        rows = await _versions(mem, user)
        text_of = {m.id: m.content for m in rows}
        for m in rows:
            events = [e["op"] for e in await mem.get_events(m.id)]
            out.append((user, m.content, m.is_current, text_of.get(m.supersedes or ""),
                        m.access_count, m.scope.key, events))
    return out


async def test_add_many_equals_one_add_after_another(
    pg_schema_url: str, second_schema_url: str,  # noqa: F811
) -> None:
    users = sorted({u for u, _ in BATCH})
    batched = await HierarchicalMemory.create(
        MemoryConfig(db_path=pg_schema_url), embedder=FakeEmbedder()
    )
    single = await HierarchicalMemory.create(
        MemoryConfig(db_path=second_schema_url), embedder=FakeEmbedder()
    )
    try:
        added = await batched.add_many(_drafts())
        one_by_one = [await single.add_many([d]) for d in _drafts()]
        # The same memory back for each op, in the batch's order (reinforced ones included).
        assert [m.content for m in added] == [m[0].content for m in one_by_one]
        assert [m.user_id for m in added] == [u for u, _ in BATCH]
        assert await _state(batched, users) == await _state(single, users)
        # The batch did dedup: alice's three texts are two memories, carol's cats superseded.
        current = {(m.user_id, m.content) for m in await _versions(batched, "alice")
                   if m.is_current}
        assert current == {("alice", "I live in Lisbon near the river"),
                           ("alice", "My favourite colour is green")}
        dave = [m.content for m in await _versions(batched, "dave") if m.is_current]
        assert dave == ["I play chess on Sundays"] * 2
        carol = [m for m in await _versions(batched, "carol") if m.is_current]
        assert [m.content for m in carol] == [f"I have 3 cats {CATS}"]
    finally:
        await batched.close()
        await single.close()


def test_rounds_hold_each_user_once_in_order() -> None:
    assert _rounds(["a", "b", "a", "c", "a", "b"]) == [[0, 1, 3], [2, 5], [4]]
    assert _rounds([]) == []


@pytest.fixture
def db(pg_db: PgDatabase) -> PgDatabase:  # noqa: F811
    return pg_db


def _unit(n: int, seed: int, dim: int = 16) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_nearest_many_is_search_top_hit_for_small_and_large_users(db: PgDatabase) -> None:
    index = PgVectorIndex(db, 16, exact_below=8)
    fact = MemoryCategory.FACT
    rid = 0
    for user, n in (("small", 3), ("large", 12)):
        for v in _unit(n, seed=n):
            rid += 1
            index.add(rid, user, user, fact, v)
    assert index.build_graph("large")
    probes = [("small", q) for q in _unit(3, 40)] + [("large", q) for q in _unit(3, 41)]
    probes.append(("nobody", _unit(1, 42)[0]))
    fresh = PgVectorIndex(db, 16, exact_below=8)  # nothing counted yet: one count statement
    got = fresh.nearest_many(probes)
    expected = [
        (hits[0] if (hits := index.search(q, u, scope_keys=None, categories=None, k=1))
         else None)
        for u, q in probes
    ]
    assert [g and g[0] for g in got] == [e and e[0] for e in expected]
    assert got[-1] is None
    assert all(abs(g[1] - e[1]) < 1e-6 for g, e in zip(got[:-1], expected[:-1], strict=True))
    assert fresh._is_large("large") and not fresh._is_large("small")


async def test_read_candidates_equals_rows_and_embeddings(pg_schema_url: str) -> None:  # noqa: F811
    mem = await HierarchicalMemory.create(
        MemoryConfig(db_path=pg_schema_url), embedder=FakeEmbedder()
    )
    try:
        added = await mem.add_many(
            [MemoryDraft(f"fact number {i} about {w}", "erin") for i, w in
             enumerate(["tea", "chess", "rain", "boats"])]
            # Every column filled, odd values: they come back through the candidates read's
            # JSON array and its epoch microseconds.
            + [MemoryDraft("Zoë's \"quoted\" ✓ fact\nover two lines", "erin", session_id="s1",
                           agent_id="a1", turn_id="t1", category="preference", importance=0.9,
                           entity_refs=["Zoë", "日本"], metadata={"ü": ["✓", 1, None], "n": 2.5},
                           created_at=datetime(1969, 7, 20, 20, 17, 40, 123456, tzinfo=UTC),
                           valid_from=datetime(2999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))]
        )
        await mem.forget(added[1].id, user_id="erin")
        await mem.supersede(added[2].id, "fact number 2 about rain, corrected", user_id="erin")
        await mem.recall("fact about tea", "erin")  # an access count and time on some rows
        mem._retrieval.access.flush()  # the access counts go to the writer at once
        await mem._executors.write(lambda: None)  # and are written when this is
        store = mem._parts.store
        rids = [store.rowid_of(m.id) for m in added]
        wanted = [r for r in rids if r is not None] + [10**9]  # a row that is not there
        columnar = store.candidates(wanted)
        generic = CandidateRows.of(store.get_by_rowids(wanted), store.embeddings_by_rowids(wanted))
        assert sorted(columnar.rowids) == sorted(generic.rowids) == sorted(wanted[:-1])
        order = generic.positions(columnar.rowids)
        for name in ("user_id", "session_id", "scope_key", "category", "content"):
            assert [getattr(generic, name)[i] for i in order] == getattr(columnar, name)
        for name in ("importance", "created_at", "valid_from", "current", "has_embedding"):
            assert np.array_equal(getattr(generic, name)[order], getattr(columnar, name))
        assert np.array_equal(generic.embeddings[order], columnar.embeddings)
        assert list(columnar.current).count(False) == 2  # the forgotten and the superseded one
        # The memories are built from the same read, field for field as get_by_rowids's.
        built = columnar.memories(columnar.rowids)
        assert built == store.get_by_rowids(columnar.rowids)
        assert any(m.access_count > 0 and m.last_accessed is not None for m in built.values())
        assert columnar.memories([10**9]) == {}
    finally:
        await mem.close()
