"""JSONL export and import: a lossless round trip, re-embedding for another model, bad input."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from headroom.memory.errors import ImportFormatError
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import MemoryConfig, MemoryFilter
from tests.fakes import FakeEmbedder

T0 = datetime(2024, 1, 1, tzinfo=UTC)
T1 = datetime(2024, 6, 1, 8, 30, 15, 123456, tzinfo=UTC)


async def fresh(path: Path, embedder: FakeEmbedder | None = None) -> HierarchicalMemory:
    return await HierarchicalMemory.create(
        MemoryConfig(db_path=path), embedder=embedder or FakeEmbedder()
    )


async def everything(memory: HierarchicalMemory, user: str) -> list:
    return await memory.query(
        MemoryFilter(user_id=user, all_scopes=True, include_superseded=True, limit=None)
    )


async def build_source(memory: HierarchicalMemory) -> None:
    old = await memory.add(
        "Lives in Berlin", "alice", "s1", "a1", "t1", category="fact", importance=0.3,
        entity_refs=["Berlin", "city"], metadata={"source": "chat", "nested": {"n": [1, 2]}},
        valid_from=T0, created_at=T0,
    )
    await memory.supersede(old.id, "Lives in Paris", at=T1, metadata={"source": "update"})
    gone = await memory.add("Has a parrot", "alice", category="entity", importance=0.9)
    await memory.forget(gone.id)
    liked = await memory.add("Likes ünïcödé ☕ and \"quotes\"\nnewline", "alice", "s2",
                             category="preference")
    await memory.add(liked.content, "alice", "s2")  # reinforce: access_count 1
    await memory.add("Plays the cello", "bob", category="insight")


def snapshot(memories: list) -> dict[str, dict]:
    return {m.id: m.to_dict() for m in memories}


async def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    source = await fresh(tmp_path / "a.db")
    dump = tmp_path / "dump.jsonl"
    try:
        await build_source(source)
        expected = {u: snapshot(await everything(source, u)) for u in ("alice", "bob")}
        vectors = {
            mid: source.store.get_embedding(mid).tobytes()  # type: ignore[attr-defined]
            for u in expected for mid in expected[u]
        }
        assert await source.export_jsonl(dump) == 5
    finally:
        await source.close()

    lines = dump.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    assert header["format"] == "headroom-memory-export"
    assert header["embedding_model"] == "fake:bow-64"
    assert len(lines) == 6

    embedder = FakeEmbedder()
    target = await fresh(tmp_path / "b.db", embedder)
    try:
        counts = await target.import_jsonl(dump)
        assert counts == {"imported": 5, "skipped": 0, "reembedded": 0}
        assert embedder.calls == []  # same model: the stored vectors are reused
        for user in ("alice", "bob"):
            assert snapshot(await everything(target, user)) == expected[user]
        for mid, blob in vectors.items():
            assert target.store.get_embedding(mid).tobytes() == blob  # type: ignore[attr-defined]

        # the chain, the forgotten memory and as-of reads survive
        alice = {m.content: m for m in await everything(target, "alice")}
        chain = await target.get_history(alice["Lives in Paris"].id)
        assert [(m.content, m.valid_from, m.valid_until) for m in chain] == [
            ("Lives in Berlin", T0, T1), ("Lives in Paris", T1, None)
        ]
        assert alice["Has a parrot"].forgotten_at is not None
        as_of = await target.query(MemoryFilter(user_id="alice", all_scopes=True,
                                                as_of=datetime(2024, 3, 1, tzinfo=UTC)))
        assert [m.content for m in as_of] == ["Lives in Berlin"]
        # only current memories are indexed, and they are searchable
        stats = await target.stats()
        assert (stats["rows"], stats["current"], stats["vectors"], stats["fts_rows"]) == (
            5, 3, 3, 3
        )
        hits = await target.search("Lives in", "alice", "s1", "a1", "t1")
        assert [r.memory.content for r in hits] == ["Lives in Paris"]
        assert [r.memory.content for r in await target.text_search("cello", "bob")] == [
            "Plays the cello"
        ]
        assert await target.text_search("parrot", "alice") == []
    finally:
        await target.close()


async def test_reimport_skips_existing_ids(tmp_path: Path) -> None:
    source = await fresh(tmp_path / "a.db")
    buffer = io.StringIO()
    try:
        await build_source(source)
        await source.export_jsonl(buffer)
        buffer.seek(0)
        counts = await source.import_jsonl(buffer)
        assert counts == {"imported": 0, "skipped": 5, "reembedded": 0}
        assert (await source.stats())["rows"] == 5
    finally:
        await source.close()


async def test_export_one_user(tmp_path: Path) -> None:
    source = await fresh(tmp_path / "a.db")
    try:
        await build_source(source)
        buffer = io.StringIO()
        assert await source.export_jsonl(buffer, user_id="bob") == 1
        rows = [json.loads(line) for line in buffer.getvalue().splitlines()[1:]]
        assert [(r["user_id"], r["content"]) for r in rows] == [("bob", "Plays the cello")]
    finally:
        await source.close()


async def test_import_with_another_model_reembeds(tmp_path: Path) -> None:
    source = await fresh(tmp_path / "a.db")
    dump = tmp_path / "dump.jsonl"
    try:
        await build_source(source)
        await source.export_jsonl(dump)
    finally:
        await source.close()

    other = FakeEmbedder(dimension=32, model_id="fake:bow-32")
    target = await fresh(tmp_path / "b.db", other)
    progress: list[int] = []
    try:
        counts = await target.import_jsonl(dump, on_progress=progress.append)
        assert counts == {"imported": 5, "skipped": 0, "reembedded": 5}
        assert sum(progress) == 5
        stored = [*await everything(target, "alice"), *await everything(target, "bob")]
        assert sorted(t for call in other.calls for t in call) == sorted(
            m.content for m in stored
        )
        for m in await everything(target, "alice"):
            assert m.embedding_model == "fake:bow-32"
            vector = target.store.get_embedding(m.id)  # type: ignore[attr-defined]
            assert vector.shape == (32,)
            np.testing.assert_allclose(vector, other.embed([m.content])[0])
        hits = await target.search("Lives in Paris", "alice", "s1", "a1", "t1", top_k=1)
        assert [r.memory.content for r in hits] == ["Lives in Paris"]
        assert hits[0].similarity == pytest.approx(1.0, abs=1e-5)
    finally:
        await target.close()


GOOD = {"content": "Likes tea", "user_id": "alice", "id": "m-good"}


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"user_id": "alice", "id": "x"}), "content"),
        (json.dumps({"content": "  ", "user_id": "alice"}), "content"),
        (json.dumps({"content": "Likes tea", "user_id": ""}), "user_id"),
        (json.dumps({**GOOD, "id": "m2", "importance": 3}), "importance"),
        (json.dumps({**GOOD, "id": "m2", "category": "opinion"}), "unknown category"),
        (json.dumps({**GOOD, "id": "m2", "created_at": "yesterday"}), "yesterday"),
    ],
)
async def test_bad_line_reports_its_number_and_writes_nothing(
    memory: HierarchicalMemory, bad_line: str, reason: str
) -> None:
    lines = [
        json.dumps({"format": "headroom-memory-export", "version": 1,
                    "embedding_model": "fake:bow-64"}),
        json.dumps(GOOD),
        "",
        bad_line,
        json.dumps({**GOOD, "id": "m-after"}),
    ]
    with pytest.raises(ImportFormatError, match=reason) as info:
        await memory.import_jsonl(io.StringIO("\n".join(lines) + "\n"))
    assert info.value.line_number == 4
    assert str(info.value).startswith("line 4: ")
    stats = await memory.stats()
    assert (stats["rows"], stats["vectors"], stats["fts_rows"]) == (0, 0, 0)


async def test_import_of_minimal_lines(memory: HierarchicalMemory) -> None:
    """A line needs only content and user_id; the rest gets defaults and an embedding."""
    text = "\n".join(json.dumps(d) for d in (
        {"content": "Likes tea", "user_id": "alice"},
        {"content": "Owns a kayak", "user_id": "alice", "session_id": "s1",
         "category": "ENTITY", "importance": 0.7},
    ))
    counts = await memory.import_jsonl(io.StringIO(text))
    assert counts == {"imported": 2, "skipped": 0, "reembedded": 2}
    found = await memory.query(MemoryFilter(user_id="alice", session_id="s1"))
    assert {(m.content, m.category.value, m.importance) for m in found} == {
        ("Likes tea", "fact", 0.5), ("Owns a kayak", "entity", 0.7)
    }
    assert [r.memory.content for r in await memory.search("kayak", "alice", "s1", top_k=1)] == [
        "Owns a kayak"
    ]


async def test_an_empty_file_is_refused_and_a_header_only_export_imports_nothing(
    memory: HierarchicalMemory,
) -> None:
    with pytest.raises(ImportFormatError, match="empty"):
        await memory.import_jsonl(io.StringIO("\n  \n"))
    empty_export = io.StringIO()
    await memory.export_jsonl(empty_export, "nobody")
    counts = await memory.import_jsonl(io.StringIO(empty_export.getvalue()))
    assert counts == {"imported": 0, "skipped": 0, "reembedded": 0}
