"""Adding, reading and changing one memory; bad input; nothing half-written."""

from __future__ import annotations

import asyncio
import itertools
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from headroom.memory.errors import (
    ConfigError,
    EmbedderError,
    HeadroomMemoryError,
    MemoryNotFoundError,
    ValidationError,
)
from headroom.memory.hierarchical import HierarchicalMemory, MemoryDraft
from headroom.memory.models import MemoryCategory, MemoryConfig, MemoryFilter, is_database_url
from tests.backend_rows import row_counts
from tests.fakes import FakeEmbedder

TABLES = ("memories", "memory_events", "memory_vectors", "memories_fts", "outbox")


def raw_counts(target: str | Path) -> dict[str, int]:
    return row_counts(target)


def db_path(memory: HierarchicalMemory) -> str | Path:
    """The engine's database: a file, or on conftest's PostgreSQL leg its schema's URL."""
    target = memory.config.db_path
    return target if is_database_url(target) else Path(str(target))


async def test_add_then_get_round_trips_every_field(memory: HierarchicalMemory) -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    added = await memory.add(
        "  Prefers dark mode  ", "alice", "s1", "a1", "t1",
        category="Preference", importance=0.3, entity_refs=["ui"],
        metadata={"source": "chat", "n": 2}, created_at=when,
    )
    assert added.content == "Prefers dark mode"  # stripped
    got = await memory.get(added.id)
    assert got == added
    assert (got.category, got.importance, got.entity_refs, got.metadata) == (
        MemoryCategory.PREFERENCE, 0.3, ["ui"], {"source": "chat", "n": 2}
    )
    assert (got.session_id, got.agent_id, got.turn_id) == ("s1", "a1", "t1")
    assert got.created_at == when and got.valid_from == when
    assert got.embedding_model == "fake:bow-64"
    assert [e["op"] for e in await memory.get_events(added.id)] == ["add"]


async def test_get_returns_a_copy(memory: HierarchicalMemory) -> None:
    added = await memory.add("Prefers dark mode", "alice")
    first = await memory.get(added.id)
    first.content = "tampered"
    first.metadata["x"] = 1
    first.entity_refs.append("tampered")
    again = await memory.get(added.id)
    assert again.content == "Prefers dark mode"
    assert again.metadata == {} and again.entity_refs == []
    again.metadata["y"] = 2
    assert (await memory.get(added.id)).metadata == {}


async def test_get_of_another_users_memory_is_not_found(memory: HierarchicalMemory) -> None:
    added = await memory.add("Prefers dark mode", "alice")
    assert (await memory.get(added.id, user_id="alice")).id == added.id
    for call in (
        memory.get(added.id, user_id="bob"),
        memory.get_history(added.id, user_id="bob"),
        memory.get_events(added.id, user_id="bob"),
        memory.update(added.id, importance=0.9, user_id="bob"),
    ):
        with pytest.raises(MemoryNotFoundError):
            await call
    assert (await memory.get(added.id)).importance == 0.5


@pytest.mark.parametrize("content", ["", "   ", "\n\t "])
async def test_empty_content_is_refused(memory: HierarchicalMemory, content: str) -> None:
    with pytest.raises(ValidationError, match="must not be empty"):
        await memory.add(content, "alice")
    base = await memory.add("Real fact", "alice")
    with pytest.raises(ValidationError, match="must not be empty"):
        await memory.supersede(base.id, content)
    assert raw_counts(db_path(memory))["memories"] == 1


@pytest.mark.parametrize("importance", [-0.01, 1.01, math.nan, math.inf, -math.inf])
async def test_importance_outside_0_1_is_refused(
    memory: HierarchicalMemory, importance: float
) -> None:
    with pytest.raises(ValidationError, match="importance"):
        await memory.add("Real fact", "alice", importance=importance)
    base = await memory.add("Real fact", "alice")
    with pytest.raises(ValidationError, match="importance"):
        await memory.update(base.id, importance=importance)
    with pytest.raises(ValidationError, match="importance"):
        await memory.supersede(base.id, "Other fact", importance=importance)
    assert (await memory.get(base.id)).importance == 0.5
    assert raw_counts(db_path(memory))["memories"] == 1


async def test_importance_bounds_are_allowed(memory: HierarchicalMemory) -> None:
    low = await memory.add("Zero importance", "alice", importance=0.0)
    high = await memory.add("Full importance", "alice", importance=1.0)
    assert (low.importance, high.importance) == (0.0, 1.0)


async def test_unknown_category_is_refused(memory: HierarchicalMemory) -> None:
    with pytest.raises(ValidationError, match="unknown category 'opinion'") as info:
        await memory.add("Real fact", "alice", category="opinion")
    assert "preference" in str(info.value)  # the message names the valid ones
    with pytest.raises(ValidationError, match="unknown category"):
        MemoryFilter(user_id="alice", categories=["opinion"])
    with pytest.raises(ValidationError, match="unknown category"):
        await memory.text_search("x", "alice", categories=["opinion"])
    assert raw_counts(db_path(memory))["memories"] == 0


@pytest.mark.parametrize("user_id", ["", "   "])
async def test_missing_user_is_refused(memory: HierarchicalMemory, user_id: str) -> None:
    with pytest.raises(ValidationError, match="user_id"):
        await memory.add("Real fact", user_id)
    with pytest.raises(ValidationError, match="user_id"):
        await memory.search("x", user_id)
    with pytest.raises(ValidationError, match="user_id"):
        await memory.text_search("x", user_id)
    with pytest.raises(ValidationError, match="user_id"):
        await memory.recall("x", user_id)


def test_memory_filter_requires_a_user() -> None:
    with pytest.raises(ValidationError, match="user_id"):
        MemoryFilter()
    with pytest.raises(ValidationError, match="user_id"):
        MemoryFilter(session_id="s1", all_scopes=True)


@pytest.mark.parametrize(
    "kwargs",
    [{"min_importance": 1.5}, {"limit": -1}, {"offset": -2}],
)
def test_memory_filter_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        MemoryFilter(user_id="alice", **kwargs)


async def test_unknown_id(memory: HierarchicalMemory) -> None:
    for call in (
        memory.get("nope"),
        memory.supersede("nope", "new text"),
        memory.forget("nope"),
        memory.update("nope", importance=0.2),
        memory.get_history("nope"),
        memory.get_events("nope"),
    ):
        with pytest.raises(MemoryNotFoundError, match="no memory with id 'nope'") as info:
            await call
        assert isinstance(info.value, HeadroomMemoryError) and isinstance(info.value, KeyError)
    assert raw_counts(db_path(memory)) == dict.fromkeys(TABLES, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hnsw_m": 32}, "hnsw"),
        ({"hnsw_ef_construction": 400}, "hnsw"),
        ({"hnsw_ef_search": 10}, "hnsw"),
        ({"embedder_backend": "bogus"}, "unknown embedder_backend 'bogus'"),
        ({"vector_dimension": 0}, "vector_dimension"),
        ({"cache_max_size": -1}, "cache_max_size"),
        ({"dedup_threshold": 0.0}, "dedup_threshold"),
        ({"bubble_importance_threshold": 1.5}, "bubble_importance_threshold"),
        ({"recall_preset": "nope"}, "unknown recall preset"),
    ],
)
async def test_bad_config(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config = MemoryConfig(db_path=tmp_path / "m.db", **kwargs)
        await HierarchicalMemory.create(config, embedder=FakeEmbedder())
    assert not (tmp_path / "m.db").exists() or raw_counts(tmp_path / "m.db")["memories"] == 0


def test_embedder_backend_string_is_accepted() -> None:
    assert MemoryConfig(db_path=":memory:", embedder_backend="OpenAI").embedder_model == (
        "text-embedding-3-small"
    )


async def test_reopen_with_another_embedder_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    async with await HierarchicalMemory.create(
        MemoryConfig(db_path=path), embedder=FakeEmbedder()
    ) as mem:
        await mem.add("Real fact", "alice")
    with pytest.raises(ConfigError, match="fake:bow-64"):
        await HierarchicalMemory.create(
            MemoryConfig(db_path=path), embedder=FakeEmbedder(32, "fake:bow-32")
        )


async def test_failing_embedder_leaves_no_row(
    memory: HierarchicalMemory, fake_embedder: FakeEmbedder
) -> None:
    fake_embedder.fail_with = EmbedderError("model exploded")
    with pytest.raises(EmbedderError, match="model exploded"):
        await memory.add("Real fact", "alice")
    base = None
    fake_embedder.fail_with = None
    base = await memory.add("Base fact", "alice")
    fake_embedder.fail_with = EmbedderError("model exploded")
    with pytest.raises(EmbedderError):
        await memory.supersede(base.id, "Newer fact")
    counts = raw_counts(db_path(memory))
    assert (counts["memories"], counts["memory_vectors"], counts["memories_fts"]) == (1, 1, 1)
    assert (await memory.get(base.id)).is_current


async def test_failure_mid_transaction_rolls_back_all_indexes(
    memory: HierarchicalMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = await memory.add("Base fact about tea", "alice")
    before = raw_counts(db_path(memory))

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    # The row and the vector are written before the text index fails.
    monkeypatch.setattr(memory.text, "add", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        await memory.add("Another fact about coffee", "alice")
    assert raw_counts(db_path(memory)) == before
    with pytest.raises(RuntimeError, match="disk on fire"):
        await memory.supersede(base.id, "Base fact about coffee")
    assert raw_counts(db_path(memory)) == before
    monkeypatch.undo()

    # The old memory is still current and fully indexed.
    assert (await memory.get(base.id)).is_current
    assert [r.memory.id for r in await memory.search("tea", "alice")] == [base.id]
    assert [r.memory.id for r in await memory.text_search("tea", "alice")] == [base.id]
    # And the engine still writes afterwards.
    await memory.add("Another fact about coffee", "alice")
    assert raw_counts(db_path(memory))["memories"] == 2


async def test_batch_add_is_all_or_nothing(memory: HierarchicalMemory) -> None:
    with pytest.raises(ValidationError):
        await memory.add_many([
            MemoryDraft("Good fact one", "alice"),
            MemoryDraft("", "alice"),
        ])
    assert raw_counts(db_path(memory))["memories"] == 0


async def test_batch_add_embeds_once(
    memory: HierarchicalMemory, fake_embedder: FakeEmbedder
) -> None:
    added = await memory.add_many([
        MemoryDraft("Likes tea", "alice"),
        MemoryDraft("Owns a bicycle", "alice", session_id="s1"),
        MemoryDraft("Speaks Portuguese", "bob"),
    ])
    assert fake_embedder.calls == [["Likes tea", "Owns a bicycle", "Speaks Portuguese"]]
    assert [m.user_id for m in added] == ["alice", "alice", "bob"]
    assert raw_counts(db_path(memory))["memories"] == 3


async def test_update_changes_annotations_in_place(memory: HierarchicalMemory) -> None:
    m = await memory.add("Likes tea", "alice", metadata={"a": 1}, entity_refs=["tea"])
    await memory.get(m.id)  # cache it
    updated = await memory.update(
        m.id, metadata={"b": 2}, importance=0.8, entity_refs=["tea", "drinks"], request_id="r1"
    )
    assert updated.id == m.id and updated.content == "Likes tea"
    got = await memory.get(m.id)
    assert (got.metadata, got.importance, got.entity_refs) == (
        {"a": 1, "b": 2}, 0.8, ["tea", "drinks"]
    )
    events = await memory.get_events(m.id)
    assert [e["op"] for e in events] == ["add", "update"]
    assert events[-1]["old"]["importance"] == 0.5 and events[-1]["new"]["importance"] == 0.8
    assert events[-1]["request_id"] == "r1"
    # still exactly one row and one index entry
    counts = raw_counts(db_path(memory))
    assert (counts["memories"], counts["memory_vectors"], counts["memories_fts"]) == (1, 1, 1)


async def test_query_filters(memory: HierarchicalMemory) -> None:
    t1 = datetime(2024, 1, 1, tzinfo=UTC)
    t2 = datetime(2024, 2, 1, tzinfo=UTC)
    t3 = datetime(2024, 3, 1, tzinfo=UTC)
    a = await memory.add("Likes tea", "alice", importance=0.9, created_at=t1,
                         category="preference")
    b = await memory.add("Works at a bank", "alice", importance=0.4, created_at=t2)
    c = await memory.add("Owns a bicycle", "alice", importance=0.7, created_at=t3,
                         category="fact")
    q = memory.query
    assert [m.id for m in await q(MemoryFilter(user_id="alice"))] == [c.id, b.id, a.id]
    assert [m.id for m in await q(MemoryFilter(user_id="alice", min_importance=0.7))] == [
        c.id, a.id
    ]
    assert [m.id for m in await q(MemoryFilter(user_id="alice", categories=["fact"]))] == [
        c.id, b.id
    ]
    assert [m.id for m in await q(MemoryFilter(user_id="alice", created_after=t2))] == [
        c.id, b.id
    ]
    assert [m.id for m in await q(MemoryFilter(user_id="alice", created_before=t2))] == [a.id]
    assert [m.id for m in await q(MemoryFilter(user_id="alice", limit=1, offset=1))] == [b.id]
    assert [m.id for m in await q(MemoryFilter(user_id="alice", limit=None, offset=2))] == [
        a.id
    ]
    assert await q(MemoryFilter(user_id="alice", limit=0)) == []


async def test_search_min_similarity_and_top_k(memory: HierarchicalMemory) -> None:
    await memory.add("red apple pie", "alice")
    await memory.add("red apple", "alice")
    await memory.add("blue ocean waves", "alice")
    results = await memory.search("red apple", "alice", top_k=10)
    assert [r.memory.content for r in results][:2] == ["red apple", "red apple pie"]
    assert results[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert all(a.similarity >= b.similarity for a, b in itertools.pairwise(results))
    close = await memory.search("red apple", "alice", min_similarity=0.5)
    assert [r.memory.content for r in close] == ["red apple", "red apple pie"]
    assert len(await memory.search("red apple", "alice", top_k=1)) == 1


async def test_text_search_is_quoted_not_raw_match(memory: HierarchicalMemory) -> None:
    """FTS5 syntax in a query is text, not operators (no error, no other user's rows)."""
    await memory.add("uses NEAR and OR in queries", "alice")
    await memory.add("secret of bob", "bob")
    for nasty in ['"', "NEAR(", "user_key:*", "a OR b*", ")(", "content:secret", "-"]:
        results = await memory.text_search(nasty, "alice")
        assert all(r.memory.user_id == "alice" for r in results)
    assert await memory.text_search("secret", "alice") == []
    assert [r.memory.content for r in await memory.text_search("NEAR", "alice")] == [
        "uses NEAR and OR in queries"
    ]


async def test_get_is_served_by_the_cache(memory: HierarchicalMemory) -> None:
    added = await memory.add("Prefers dark mode", "alice")
    await memory.get(added.id)
    assert (await memory.stats())["cache_size"] == 1
    hits = memory.cache.hits  # type: ignore[union-attr]
    await memory.get(added.id)
    assert memory.cache.hits == hits + 1  # type: ignore[union-attr]


async def test_cached_copy_follows_writes(memory: HierarchicalMemory) -> None:
    """Every write path that changes a memory drops its cached copy."""
    m = await memory.add("Prefers dark mode", "alice")
    await memory.get(m.id)
    await memory.add("prefers dark mode!", "alice", importance=0.7)  # reinforce
    got = await memory.get(m.id)
    assert (got.access_count, got.importance) == (1, 0.7)
    await memory.update(m.id, metadata={"k": "v"})
    assert (await memory.get(m.id)).metadata == {"k": "v"}
    recalled = await memory.recall("dark mode", "alice")
    assert [r.id for r in recalled] == [m.id]
    for _ in range(200):  # access is recorded in the background
        if (await memory.get(m.id)).access_count == 2:
            break
        await asyncio.sleep(0.01)
    assert (await memory.get(m.id)).access_count == 2
    assert (await memory.get(m.id)).last_accessed is not None
    await memory.forget(m.id)
    assert not (await memory.get(m.id)).is_current


def _open_files(name: str) -> int:
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if name in str(fd.resolve(strict=False)))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("kwargs", [{"recall_preset": "nope"}])
async def test_failed_create_leaves_no_open_file(tmp_path: Path, kwargs: dict) -> None:
    path = tmp_path / "leak-check.db"
    with pytest.raises(ConfigError):
        await HierarchicalMemory.create(
            MemoryConfig(db_path=path, **kwargs), embedder=FakeEmbedder()
        )
    assert _open_files("leak-check.db") == 0


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
async def test_failed_create_with_another_model_leaves_no_open_file(tmp_path: Path) -> None:
    path = tmp_path / "leak-check.db"
    async with await HierarchicalMemory.create(
        MemoryConfig(db_path=path), embedder=FakeEmbedder()
    ):
        pass
    with pytest.raises(ConfigError):
        await HierarchicalMemory.create(
            MemoryConfig(db_path=path), embedder=FakeEmbedder(32, "fake:bow-32")
        )
    assert _open_files("leak-check.db") == 0
