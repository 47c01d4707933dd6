"""Access counts: written after the recalls that caused them, a burst in one writer job, every
access counted (twice for a memory recalled twice), none lost at close."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from headroom.memory.access_log import AccessLog
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import MemoryConfig
from tests.fakes import FakeEmbedder


def _spy(memory: HierarchicalMemory, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The batches the access log hands to the writer."""
    access = memory._retrieval.access
    handed: list[Any] = []
    real = access._write_later

    def write_later(fn: Any, batch: Any) -> bool:
        handed.append(batch)
        return real(fn, batch)

    monkeypatch.setattr(access, "_write_later", write_later)
    return handed


async def _count(memory: HierarchicalMemory, memory_id: str, want: int) -> int:
    deadline = time.monotonic() + 5
    while (got := (await memory.get(memory_id)).access_count) != want:
        if time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.01)
    return got


async def test_a_burst_of_recalls_is_counted_in_one_write_after_they_return(
    memory: HierarchicalMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    bees = await memory.add("Keeps bees on the roof", "alice")
    tomatoes = await memory.add("Grows tomatoes on the balcony", "alice")
    handed = _spy(memory, monkeypatch)
    memory._retrieval.access.delay_s = 60  # the test says when the batch goes
    for _ in range(5):
        recalled = await memory.recall("bees on the roof", "alice", top_k=1)
        assert [m.id for m in recalled] == [bees.id]
    assert handed == []  # nothing for the writer while the recalls are answered
    assert (await memory.get(bees.id)).access_count == 0
    memory._retrieval.access.flush()
    assert await _count(memory, bees.id, 5) == 5
    assert len(handed) == 1 and [ids for ids, _ in handed[0]] == [[bees.id]] * 5
    got = await memory.get(bees.id)
    assert got.last_accessed is not None
    assert (await memory.get(tomatoes.id)).access_count == 0


async def test_the_batch_goes_by_itself_within_the_delay(
    memory: HierarchicalMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    bees = await memory.add("Keeps bees on the roof", "alice")
    handed = _spy(memory, monkeypatch)
    await memory.recall("bees on the roof", "alice", top_k=1)
    await memory.recall("bees on the roof", "alice", top_k=1)
    assert await _count(memory, bees.id, 2) == 2
    assert len(handed) == 1  # both recalls came within the delay: one job


async def test_accesses_pending_at_close_are_written(
    memory: HierarchicalMemory, tmp_path: Path, fake_embedder: FakeEmbedder
) -> None:
    bees = await memory.add("Keeps bees on the roof", "alice")
    memory._retrieval.access.delay_s = 60
    await memory.recall("bees on the roof", "alice", top_k=1)
    await memory.close()
    again = await HierarchicalMemory.create(
        MemoryConfig(db_path=tmp_path / "m.db"), embedder=fake_embedder
    )
    try:
        assert (await again.get(bees.id)).access_count == 1
    finally:
        await again.close()


def test_a_record_from_a_second_loop_sends_the_first_loops_batch_too() -> None:
    """An engine shared by two event loops: the one that scheduled the batch may never run its
    timer again, so a record from the other hands everything over at once."""
    handed: list[Any] = []
    log = AccessLog(parts=None, write_later=lambda fn, batch: handed.append(batch) or True,  # type: ignore[arg-type]
                    delay_s=60)
    when = datetime(2026, 12, 2, tzinfo=UTC)

    async def record(memory_id: str) -> None:
        log.record([memory_id], when)

    asyncio.run(record("a"))  # its loop closes with the timer pending
    assert handed == []
    asyncio.run(record("b"))
    assert handed == [[(["a"], when), (["b"], when)]]
