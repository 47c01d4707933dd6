"""Property: whatever sequence of add / supersede / forget / purge runs across several users, no
read path ever returns another user's memory, and current reads return exactly the current
memories the request's scope may see (never a superseded or forgotten one)."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headroom.memory.errors import MemoryNotFoundError, SupersededError
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import Memory, MemoryConfig, MemoryFilter
from tests.fakes import FakeEmbedder

USERS = ["u0", "u1", "u2", "u3"]
# (session, agent, turn) of a memory or of a request
PLACES = [
    (None, None, None),
    ("s1", None, None),
    ("s2", None, None),
    ("s1", "a1", None),
    ("s1", "a2", None),
    ("s1", "a1", "t1"),
]
WORDS = ["red", "blue", "tea", "cat", "dog", "oak"]

users = st.sampled_from(USERS)
places = st.sampled_from(PLACES)
# Every content contains "zebra", so a text search for it finds every visible memory; the small
# vocabulary makes exact and near (same words, other order) duplicates common.
contents = st.tuples(st.sampled_from(WORDS), st.sampled_from(WORDS)).map(
    lambda ws: f"zebra {ws[0]} {ws[1]}"
)
importances = st.sampled_from([0.2, 0.5, 0.9])  # 0.9 bubbles to USER scope

ops = st.one_of(
    st.tuples(st.just("add"), users, places, contents, importances),
    st.tuples(st.just("supersede"), users, st.integers(0, 50), contents),
    st.tuples(st.just("forget"), users, st.integers(0, 50)),
    st.tuples(st.just("purge"), users, st.sampled_from([None, "s1", "s2"])),
    st.tuples(st.just("check"), users, places),
)


def visible(memory_place: tuple, request: tuple) -> bool:
    """Each of the memory's session/agent/turn ids is unset or equal to the request's."""
    return all(m is None or m == r for m, r in zip(memory_place, request, strict=True))


@dataclass
class Model:
    owner: dict[str, str] = field(default_factory=dict)  # every id ever made, not purged
    place: dict[str, tuple] = field(default_factory=dict)
    current: set[str] = field(default_factory=set)
    order: list[str] = field(default_factory=list)  # ids in creation order (for picking)

    def record(self, memory: Memory, user: str) -> None:
        assert memory.user_id == user, "a write returned another user's memory"
        if memory.id not in self.owner:
            self.order.append(memory.id)
        self.owner[memory.id] = user
        self.place[memory.id] = (memory.session_id, memory.agent_id, memory.turn_id)
        assert memory.is_current
        self.current.add(memory.id)

    def pick(self, index: int) -> str | None:
        return self.order[index % len(self.order)] if self.order else None

    def expected(self, user: str, request: tuple) -> set[str]:
        return {
            mid for mid in self.current
            if self.owner[mid] == user and visible(self.place[mid], request)
        }


async def check(memory: HierarchicalMemory, model: Model, user: str, request: tuple) -> None:
    s, a, t = request
    expected = model.expected(user, request)
    found = {
        "query": [m for m in await memory.query(
            MemoryFilter(user_id=user, session_id=s, agent_id=a, turn_id=t, limit=None))],
        "search": [r.memory for r in await memory.search("zebra", user, s, a, t, top_k=200)],
        "text": [r.memory for r in await memory.text_search("zebra", user, s, a, t, top_k=200)],
        "hybrid": [r.memory for r in await memory.hybrid_search("zebra", user, s, a, t,
                                                                top_k=200)],
        "recall": await memory.recall("zebra", user, s, a, t, top_k=200, touch=False),
    }
    for path, memories in found.items():
        assert all(m.user_id == user for m in memories), f"{path} leaked another user's memory"
        assert all(m.is_current for m in memories), f"{path} returned a non-current memory"
        assert {m.id for m in memories} == expected, path
    history = await memory.query(MemoryFilter(user_id=user, all_scopes=True,
                                              include_superseded=True, limit=None))
    assert {m.id for m in history} == {mid for mid, u in model.owner.items() if u == user}
    stats = await memory.stats(user)
    n_current = len({mid for mid in model.current if model.owner[mid] == user})
    assert stats["vectors"] == stats["fts_rows"] == stats["current"] == n_current


async def run_program(path: Path, program: list[tuple]) -> None:
    memory = await HierarchicalMemory.create(
        MemoryConfig(db_path=path), embedder=FakeEmbedder(dimension=128)
    )
    model = Model()
    try:
        for op in program:
            kind, user = op[0], op[1]
            if kind == "add":
                _, _, place, content, importance = op
                model.record(await memory.add(content, user, *place, importance=importance),
                             user)
            elif kind in ("supersede", "forget"):
                target = model.pick(op[2])
                if target is None:
                    continue
                try:
                    if kind == "supersede":
                        new = await memory.supersede(target, op[3], user_id=user)
                    else:
                        await memory.forget(target, user_id=user)
                except MemoryNotFoundError:
                    assert model.owner[target] != user
                    continue
                except SupersededError:
                    assert model.owner[target] == user and target not in model.current
                    continue
                assert model.owner[target] == user and target in model.current
                model.current.discard(target)
                if kind == "supersede":
                    model.record(new, user)
            elif kind == "purge":
                session = op[2]
                await memory.purge(user, session_id=session)
                for mid in [m for m, u in model.owner.items() if u == user]:
                    if session is None or model.place[mid][0] == session:
                        del model.owner[mid], model.place[mid]
                        model.current.discard(mid)
                        model.order.remove(mid)
            else:
                await check(memory, model, user, op[2])
        for user in USERS:
            for place in PLACES:
                await check(memory, model, user, place)
    finally:
        await memory.close()


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(program=st.lists(ops, min_size=1, max_size=25))
def test_no_read_path_leaks_across_users_or_time(program: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run_program(Path(tmp) / "m.db", program))
