"""The `MemoryStore` contract, run over every storage family in tests/contracts/backends.py.

A backend passes when rows round-trip whole, every read is confined to one user inside the query,
`MemoryFilter` means the same thing everywhere (scope visibility, current vs superseded, as-of,
categories, importance, creation window, newest-first order, limit and offset), the supersession
chain and the audit trail read back in order, and purge deletes exactly what it reports.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from headroom.memory.models import MemoryCategory, MemoryFilter
from headroom.memory.ports import MemoryStore
from tests.contracts.backends import Storage
from tests.contracts.builders import T0, at, axis, ids, memory, put


def flt(user: str = "alice", **fields: object) -> MemoryFilter:
    return MemoryFilter(user_id=user, **fields)  # type: ignore[arg-type]


def test_is_a_memory_store(store: MemoryStore) -> None:
    assert isinstance(store, MemoryStore)


# --- rows ------------------------------------------------------------------------------------


def test_a_row_round_trips_every_field(storage: Storage) -> None:
    original = memory(
        "Prefers tea — not coffee ☕", session_id="s1", agent_id="a1", turn_id="t1",
        category=MemoryCategory.PREFERENCE, importance=0.75, entity_refs=["tea", "coffee"],
        metadata={"source": "chat", "nested": {"n": 1}}, created_at=at(1), valid_from=at(2),
        access_count=3, last_accessed=at(5), embedding_model="fake:model",
    )
    rid = put(storage, original)
    assert isinstance(rid, int)
    stored = storage.store.get(original.id)
    assert stored == original  # dataclass equality: every field but the embedding
    assert stored is not None and stored.created_at.tzinfo is not None
    assert storage.store.rowid_of(original.id) == rid
    assert storage.store.get("no-such-id") is None
    assert storage.store.rowid_of("no-such-id") is None


def test_rowids_are_distinct_and_read_back_in_bulk(storage: Storage) -> None:
    # More rows than SQLite lets one statement bind: bulk reads must not have a size limit.
    mems = [memory(f"fact {i}") for i in range(1200)]
    with storage.store.transaction():
        rids = [storage.store.insert(m) for m in mems]
    assert len(set(rids)) == len(rids)
    found = storage.store.get_by_rowids([*rids, max(rids) + 1000])
    assert set(found) == set(rids)
    assert all(found[r].id == m.id for r, m in zip(rids, mems, strict=True))
    assert storage.store.get_by_rowids([]) == {}


def test_embeddings_are_stored_with_their_row(storage: Storage) -> None:
    with_vector = memory("with")
    without = memory("without")
    rid = put(storage, with_vector, axis(3, 0.5))
    with storage.store.transaction():
        plain_rid = storage.store.insert(without)
    vector = storage.store.get_embedding(with_vector.id)
    assert vector is not None and vector.dtype == np.float32
    np.testing.assert_array_equal(vector, axis(3, 0.5))
    assert storage.store.get_embedding(without.id) is None
    assert storage.store.get_embedding("no-such-id") is None
    by_rowid = storage.store.embeddings_by_rowids([rid, plain_rid])
    assert list(by_rowid) == [rid]
    np.testing.assert_array_equal(by_rowid[rid], axis(3, 0.5))


def test_candidates_read_what_recall_weighs_column_by_column(storage: Storage) -> None:
    when = at(1).replace(microsecond=654321)
    fact = memory("Is vegetarian?", session_id="s1", importance=0.9, created_at=when,
                  valid_from=at(2), category=MemoryCategory.PREFERENCE)
    old = memory("Lived in Rome", user="bob", valid_until=at(3))
    rid = put(storage, fact, axis(3, 0.5))
    with storage.store.transaction():
        old_rid = storage.store.insert(old)
    missing = max(rid, old_rid) + 1000
    rows = storage.store.candidates([old_rid, rid, missing])
    assert sorted(rows.rowids) == sorted([old_rid, rid])
    i, j = rows.at[rid], rows.at[old_rid]
    assert (rows.user_id[i], rows.session_id[i], rows.scope_key[i]) == (
        "alice", "s1", fact.scope.key)
    assert (rows.category[i], rows.content[i]) == ("preference", "Is vegetarian?")
    assert rows.importance[i] == pytest.approx(0.9)
    # Exact microseconds: what `datetime.timestamp()` and time comparisons read.
    assert rows.created_at[i] / 1e6 == when.timestamp()
    assert rows.valid_from[i] / 1e6 == at(2).timestamp()
    assert list(rows.current[[i, j]]) == [True, False]
    np.testing.assert_array_equal(rows.embedding(rid), axis(3, 0.5))
    assert rows.embedding(old_rid) is None and rows.user_id[j] == "bob"
    assert rows.memories([rid, missing]) == {rid: fact}
    assert len(storage.store.candidates([])) == 0


def test_candidates_read_in_two_parts_join_to_one_read(storage: Storage) -> None:
    rids = [put(storage, memory(f"fact {i}", session_id=f"s{i % 2}", importance=0.1 * i),
                axis(3, 0.1 * i)) for i in range(1, 6)]
    with storage.store.transaction():
        plain = storage.store.insert(memory("no vector", user="bob"))
    missing = max(rids) + 1000
    wanted = [rids[3], plain, missing, rids[0], rids[2], rids[4]]
    whole = storage.store.candidates(wanted)
    early = storage.store.candidates([rids[0], rids[1], rids[3]])  # rids[1]: not wanted
    joined = early.joined(storage.store.candidates([plain, rids[2], rids[4], missing]), wanted)
    assert joined.rowids == [r for r in wanted if r in whole]  # in the order asked
    assert rids[1] not in joined and missing not in joined
    for rid in joined.rowids:
        i, j = joined.at[rid], whole.at[rid]
        assert (joined.user_id[i], joined.session_id[i], joined.content[i]) == (
            whole.user_id[j], whole.session_id[j], whole.content[j])
        assert (joined.importance[i], joined.created_at[i], joined.current[i]) == (
            whole.importance[j], whole.created_at[j], whole.current[j])
        assert (joined.embedding(rid) is None) == (whole.embedding(rid) is None)
        if whole.embedding(rid) is not None:
            np.testing.assert_array_equal(joined.embedding(rid), whole.embedding(rid))
    assert joined.memories([rids[3], plain]) == whole.memories([rids[3], plain])
    # A later read wins over an earlier one for the same row.
    closed = replace(storage.store.get_by_rowids([rids[0]])[rids[0]], valid_until=at(50))
    with storage.store.transaction():
        storage.store.save(closed)
    fresh = early.joined(storage.store.candidates([rids[0]]), [rids[0]])
    assert not fresh.current[fresh.at[rids[0]]] and early.current[early.at[rids[0]]]


def test_save_writes_back_the_mutable_fields(storage: Storage) -> None:
    mem = memory("Lives in Paris", session_id="s1")
    put(storage, mem)
    changed = replace(
        mem, session_id=None, category=MemoryCategory.ENTITY, importance=0.9,
        entity_refs=["paris"], metadata={"checked": True}, access_count=7, last_accessed=at(9),
        valid_until=at(10), superseded_by="next-id", forgotten_at=at(10),
    )
    with storage.store.transaction():
        storage.store.save(changed)
    assert storage.store.get(mem.id) == changed


def test_touch_counts_accesses(storage: Storage) -> None:
    a, b = memory("a"), memory("b")
    put(storage, a)
    put(storage, b)
    with storage.store.transaction():
        storage.store.touch([a.id, "no-such-id"], at(30))
        storage.store.touch([a.id], at(31))
    touched, untouched = storage.store.get(a.id), storage.store.get(b.id)
    assert touched is not None and untouched is not None
    assert (touched.access_count, touched.last_accessed) == (2, at(31))
    assert (untouched.access_count, untouched.last_accessed) == (0, None)


def test_a_returned_memory_is_the_callers_copy(storage: Storage) -> None:
    mem = memory("x", metadata={"k": 1})
    put(storage, mem)
    got = storage.store.get(mem.id)
    assert got is not None
    got.metadata["k"] = 2
    got.importance = 0.1
    assert storage.store.get(mem.id) == mem


# --- query: isolation, scope, time, filters, order -------------------------------------------


def test_reads_never_return_another_users_rows(storage: Storage) -> None:
    mine = memory("Alice's fact", "alice")
    put(storage, mine)
    for i in range(5):
        put(storage, memory(f"Bob's fact {i}", "bob", session_id="s1"))
    for f in (flt(), flt(all_scopes=True), flt(include_superseded=True), flt(session_id="s1")):
        assert ids(storage.store.query(f)) == [mine.id]
        assert storage.store.count(f) == 1
    assert ids(storage.store.query(flt("carol"))) == []
    assert storage.store.recent_contents("alice", 10) == ["Alice's fact"]
    assert [m.id for m in storage.store.iter_all("alice")] == [mine.id]


@pytest.fixture
def scoped(storage: Storage) -> dict[str, str]:
    """One memory at each position of the scope tree, plus siblings that must stay hidden."""
    positions = {
        "user": {},
        "s1": {"session_id": "s1"},
        "s2": {"session_id": "s2"},
        "s1/a1": {"session_id": "s1", "agent_id": "a1"},
        "s1/a2": {"session_id": "s1", "agent_id": "a2"},
        "s1/a1/t1": {"session_id": "s1", "agent_id": "a1", "turn_id": "t1"},
        "s1/a1/t2": {"session_id": "s1", "agent_id": "a1", "turn_id": "t2"},
    }
    out = {}
    for name, scope in positions.items():
        mem = memory(name, **scope)
        put(storage, mem)
        out[name] = mem.id
    return out


@pytest.mark.parametrize(
    ("position", "visible"),
    [
        ({}, ["user"]),
        ({"session_id": "s1"}, ["user", "s1"]),
        ({"session_id": "s1", "agent_id": "a1"}, ["user", "s1", "s1/a1"]),
        (
            {"session_id": "s1", "agent_id": "a1", "turn_id": "t1"},
            ["user", "s1", "s1/a1", "s1/a1/t1"],
        ),
        ({"session_id": "s3"}, ["user"]),
    ],
)
def test_a_request_sees_its_level_and_broader_never_siblings(
    storage: Storage, scoped: dict[str, str], position: dict[str, str], visible: list[str]
) -> None:
    f = flt(**position)
    assert sorted(ids(storage.store.query(f))) == sorted(scoped[v] for v in visible)
    assert storage.store.count(f) == len(visible)


@pytest.mark.parametrize(
    ("equalities", "selected"),
    [
        ({}, ["user", "s1", "s2", "s1/a1", "s1/a2", "s1/a1/t1", "s1/a1/t2"]),
        ({"session_id": "s1"}, ["s1", "s1/a1", "s1/a2", "s1/a1/t1", "s1/a1/t2"]),
        ({"agent_id": "a1"}, ["s1/a1", "s1/a1/t1", "s1/a1/t2"]),
        ({"turn_id": "t2"}, ["s1/a1/t2"]),
    ],
)
def test_all_scopes_reads_ids_as_equality_filters(
    storage: Storage, scoped: dict[str, str], equalities: dict[str, str], selected: list[str]
) -> None:
    f = flt(all_scopes=True, **equalities)
    assert sorted(ids(storage.store.query(f))) == sorted(scoped[s] for s in selected)


def supersede_pair(storage: Storage) -> tuple[str, str]:
    """'Works at Google' (valid from 0 to 10) superseded by 'Works at Anthropic' (from 10)."""
    old = memory("Works at Google", created_at=at(0))
    new = memory("Works at Anthropic", created_at=at(10), supersedes=old.id)
    put(storage, old)
    closed = replace(old, valid_until=at(10), superseded_by=new.id)
    with storage.store.transaction():
        storage.store.save(closed)
    put(storage, new)
    return old.id, new.id


def test_current_reads_leave_superseded_rows_out(storage: Storage) -> None:
    old, new = supersede_pair(storage)
    assert ids(storage.store.query(flt())) == [new]
    assert ids(storage.store.query(flt(include_superseded=True))) == [new, old]
    assert storage.store.count(flt()) == 1
    assert storage.store.count(flt(include_superseded=True)) == 2
    assert storage.store.recent_contents("alice", 10) == ["Works at Anthropic"]


def test_as_of_reads_what_was_valid_then(storage: Storage) -> None:
    old, new = supersede_pair(storage)
    assert ids(storage.store.query(flt(as_of=at(5)))) == [old]
    assert ids(storage.store.query(flt(as_of=at(10)))) == [new]  # valid_until is exclusive
    assert ids(storage.store.query(flt(as_of=at(-1)))) == []
    assert ids(storage.store.query(flt(as_of=at(60)))) == [new]
    # as_of asks about a time, so it reads history even without include_superseded
    assert ids(storage.store.query(flt(as_of=at(5), include_superseded=False))) == [old]


def test_category_importance_and_creation_window(storage: Storage) -> None:
    rows = {
        "pref-high": memory("p", category=MemoryCategory.PREFERENCE, importance=0.9,
                            created_at=at(1)),
        "fact-mid": memory("f", importance=0.7, created_at=at(2)),
        "fact-low": memory("g", importance=0.2, created_at=at(3)),
        "decision": memory("d", category=MemoryCategory.DECISION, importance=0.7,
                           created_at=at(4)),
    }
    for mem in rows.values():
        put(storage, mem)

    def names(f: MemoryFilter) -> set[str]:
        found = set(ids(storage.store.query(f)))
        return {name for name, mem in rows.items() if mem.id in found}

    cats = [MemoryCategory.PREFERENCE, MemoryCategory.FACT]
    assert names(flt(categories=cats)) == {"pref-high", "fact-mid", "fact-low"}
    assert names(flt(min_importance=0.7)) == {"pref-high", "fact-mid", "decision"}
    assert names(flt(categories=cats, min_importance=0.7)) == {"pref-high", "fact-mid"}
    # created_after is inclusive, created_before exclusive
    assert names(flt(created_after=at(2), created_before=at(4))) == {"fact-mid", "fact-low"}


def test_query_is_newest_first_then_latest_inserted(storage: Storage) -> None:
    order = [3, 1, 4, 1, 5, 9, 2, 6]  # creation minutes, inserted in this order (two ties)
    mems = [memory(f"m{i}", created_at=at(minute)) for i, minute in enumerate(order)]
    for mem in mems:
        put(storage, mem)
    expected = [
        mems[i].id for i in sorted(range(len(order)), key=lambda i: (order[i], i), reverse=True)
    ]
    assert ids(storage.store.query(flt())) == expected
    assert ids(storage.store.query(flt(limit=3))) == expected[:3]
    assert ids(storage.store.query(flt(limit=3, offset=2))) == expected[2:5]
    assert ids(storage.store.query(flt(limit=None, offset=6))) == expected[6:]
    assert ids(storage.store.query(flt(limit=0))) == []
    assert storage.store.count(flt(limit=3, offset=2)) == len(order)  # counts ignore paging
    assert storage.store.recent_contents("alice", 2) == ["m5", "m7"]


def test_exact_duplicates_are_found_by_normalised_content(storage: Storage) -> None:
    first = memory("Likes  green tea.")
    put(storage, first)
    put(storage, memory("likes green tea", "bob"))
    for spelling in ("likes green tea", "LIKES GREEN TEA!", "  Likes green   tea  "):
        found = storage.store.find_current_by_content("alice", spelling)
        assert found is not None and found.id == first.id
    assert storage.store.find_current_by_content("alice", "likes black tea") is None
    assert storage.store.find_current_by_content("carol", "likes green tea") is None


def test_exact_duplicates_are_current_ones(storage: Storage) -> None:
    _, new = supersede_pair(storage)
    assert storage.store.find_current_by_content("alice", "works at google") is None
    found = storage.store.find_current_by_content("alice", "Works at Anthropic")
    assert found is not None and found.id == new


def test_embeddings_as_of_follow_the_filter(storage: Storage) -> None:
    old = memory("Works at Google", created_at=at(0))
    new = memory("Works at Anthropic", created_at=at(10), supersedes=old.id)
    old_rid = put(storage, old, axis(1))
    with storage.store.transaction():
        storage.store.save(replace(old, valid_until=at(10), superseded_by=new.id))
    new_rid = put(storage, new, axis(2))
    put(storage, memory("Bob's", "bob"), axis(3))

    def rows(f: MemoryFilter) -> dict[int, list[float]]:
        return {rid: v.tolist() for rid, v in storage.store.embeddings_as_of(f)}

    assert rows(flt(as_of=at(5))) == {old_rid: axis(1).tolist()}
    assert rows(flt(include_superseded=True)) == {
        old_rid: axis(1).tolist(), new_rid: axis(2).tolist()
    }


# --- chain, events, settings -----------------------------------------------------------------


def test_the_chain_reads_oldest_first_from_any_link(storage: Storage) -> None:
    a = memory("v1", created_at=at(0))
    b = memory("v2", created_at=at(1), supersedes=a.id)
    c = memory("v3", created_at=at(2), supersedes=b.id)
    for mem in (a, b, c):
        put(storage, mem)
    with storage.store.transaction():
        storage.store.save(replace(a, valid_until=at(1), superseded_by=b.id))
        storage.store.save(replace(b, valid_until=at(2), superseded_by=c.id))
    for start in (a.id, b.id, c.id):
        assert ids(storage.store.chain(start)) == [a.id, b.id, c.id]
    lone = memory("alone")
    put(storage, lone)
    assert ids(storage.store.chain(lone.id)) == [lone.id]
    assert storage.store.chain("no-such-id") == []


def test_events_read_back_in_the_order_recorded(storage: Storage) -> None:
    mem = memory("x")
    put(storage, mem)
    with storage.store.transaction():
        storage.store.record_event(mem.id, "alice", "add", new={"content": "x"}, at=at(1),
                                   request_id="req-1")
        storage.store.record_event(mem.id, "alice", "reinforce", old={"n": [1, 2]},
                                   new={"importance": 0.8}, at=at(2))
        storage.store.record_event(mem.id, "alice", "forget")
        storage.store.record_event("other-id", "alice", "add")
    events = storage.store.events(mem.id)
    assert [e["op"] for e in events] == ["add", "reinforce", "forget"]
    assert events[0] == {"op": "add", "at": at(1), "request_id": "req-1", "old": None,
                         "new": {"content": "x"}}
    assert (events[1]["old"], events[1]["new"]) == ({"n": [1, 2]}, {"importance": 0.8})
    assert events[2]["at"] is not None and events[2]["at"] > T0  # defaults to now
    assert storage.store.events("no-such-id") == []


def test_settings(store: MemoryStore) -> None:
    assert store.get_setting("embedding_model") is None
    with store.transaction():
        store.set_setting("embedding_model", "fake:a")
        store.set_setting("embedding_model", "fake:b")
    assert store.get_setting("embedding_model") == "fake:b"


def test_iter_all_yields_every_row_in_insertion_order_with_its_embedding(
    storage: Storage,
) -> None:
    old, new = supersede_pair(storage)
    bob = memory("Bob's", "bob", created_at=at(-5))
    put(storage, bob, axis(4))
    everything = list(storage.store.iter_all())
    assert ids(everything) == [old, new, bob.id]
    assert everything[2].embedding == axis(4).tolist()
    assert ids(list(storage.store.iter_all("alice"))) == [old, new]


# --- purge and stats -------------------------------------------------------------------------


def test_purging_a_user_deletes_every_row_and_event_and_counts_them(storage: Storage) -> None:
    old, new = supersede_pair(storage)
    bob = memory("Bob's", "bob")
    bob_rid = put(storage, bob)
    with storage.store.transaction():
        for memory_id in (old, new):
            storage.store.record_event(memory_id, "alice", "add")
        storage.store.record_event(old, "alice", "supersede")
        storage.store.record_event(bob.id, "bob", "add")
    rids = {storage.store.rowid_of(old), storage.store.rowid_of(new)}
    with storage.store.transaction():
        purged, counts = storage.store.purge(flt())
    storage.store.checkpoint()
    assert set(purged) == rids
    assert (counts["memories"], counts["events"]) == (2, 3)
    assert storage.store.get(old) is None and storage.store.get(new) is None
    assert storage.store.query(flt(include_superseded=True)) == []
    assert storage.store.events(old) == [] and storage.store.events(new) == []
    assert storage.store.stats("alice")["rows"] == 0
    assert storage.store.get_by_rowids([bob_rid])[bob_rid].id == bob.id
    assert len(storage.store.events(bob.id)) == 1
    with storage.store.transaction():
        assert storage.store.purge(flt())[1]["memories"] == 0  # nothing left: counts say so


def test_purging_a_scope_takes_only_that_scope(storage: Storage, scoped: dict[str, str]) -> None:
    with storage.store.transaction():
        for memory_id in scoped.values():
            storage.store.record_event(memory_id, "alice", "add")
        purged, counts = storage.store.purge(flt(session_id="s1", agent_id="a1"))
    gone = {"s1/a1", "s1/a1/t1", "s1/a1/t2"}
    assert (counts["memories"], counts["events"], len(purged)) == (3, 3, 3)
    left = set(ids(storage.store.query(flt(all_scopes=True))))
    assert left == {scoped[name] for name in scoped if name not in gone}
    assert all(storage.store.events(scoped[name]) == [] for name in gone)
    assert all(len(storage.store.events(scoped[name])) == 1 for name in scoped if name not in gone)


def test_stats_count_rows_by_state_category_scope_and_user(storage: Storage) -> None:
    supersede_pair(storage)  # one superseded, one current fact
    put(storage, memory("p", category=MemoryCategory.PREFERENCE, session_id="s1"))
    forgotten = memory("gone", agent_id="a1", session_id="s1")
    put(storage, forgotten)
    with storage.store.transaction():
        storage.store.save(replace(forgotten, valid_until=at(20), forgotten_at=at(20)))
    put(storage, memory("b", "bob"))
    mine = storage.store.stats("alice")
    assert {k: mine[k] for k in ("total", "current", "superseded", "forgotten", "rows")} == {
        "total": 2, "current": 2, "superseded": 1, "forgotten": 1, "rows": 4,
    }
    assert mine["categories"] == {"fact": 1, "preference": 1}
    assert mine["scopes"] == {"user": 1, "session": 1, "agent": 0, "turn": 0}
    assert mine["users"] == {"alice": 2}
    everyone = storage.store.stats()
    assert (everyone["current"], everyone["rows"]) == (3, 5)
    assert everyone["users"] == {"alice": 2, "bob": 1}
