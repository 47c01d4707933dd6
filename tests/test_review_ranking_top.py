"""Review regressions of `Ranking.top` (retrieval.py): SQLite builds the returned memories after
ranking, so the memory read then must still be the row that was weighed, and still current.
PostgreSQL builds them from the candidates read itself (`postgres/candidate_rows.py`)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from headroom.memory.hierarchical import HierarchicalMemory, MemoryDraft
from headroom.memory.models import Scope
from headroom.memory.retrieval import Ranking

_ONE_READ = pytest.mark.sqlite_only(
    "PostgreSQL builds whole memories with the candidates, in one read: no later read to differ"
)

NOW = datetime(2024, 3, 15, 12, 0, tzinfo=UTC)


async def _ranking(memory: HierarchicalMemory, query: str, scope: Scope) -> Ranking:
    retrieval = memory._retrieval
    vector = await memory.embed_query(query)
    ranking: Ranking = await retrieval.executors.read(lambda: retrieval._ranked(
        query, scope, 3, None, NOW, retrieval.preset, vector))
    return ranking


async def _top(memory: HierarchicalMemory, ranking: Ranking) -> list[str]:
    top = await memory._retrieval.executors.read(lambda: ranking.top(3))
    return [m.content for _, m in top]


@_ONE_READ
async def test_a_memory_forgotten_after_ranking_is_not_returned(
    memory: HierarchicalMemory,
) -> None:
    added = await memory.add_many([
        MemoryDraft("sailing boats on the lake", "dave", dedup=False),
        MemoryDraft("sailing boats at sea", "dave", dedup=False),
    ])
    ranking = await _ranking(memory, "sailing boats", Scope("dave"))
    assert len(ranking.scored) == 2
    await memory.forget(added[0].id, user_id="dave")
    assert await _top(memory, ranking) == ["sailing boats at sea"]


@_ONE_READ
async def test_a_row_key_reused_by_another_user_after_ranking_is_not_returned(
    memory: HierarchicalMemory,
) -> None:
    """memories.rid is not AUTOINCREMENT: after a purge of the newest row the next insert,
    any user's, takes its key."""
    await memory.add_many([
        MemoryDraft("sailing boats at sea", "dave", dedup=False),
        MemoryDraft("sailing boats on the lake", "dave", session_id="s1", dedup=False),
    ])
    ranking = await _ranking(memory, "sailing boats", Scope("dave", "s1"))
    assert len(ranking.scored) == 2
    await memory.purge("dave", session_id="s1")
    await memory.add("erin's sailing boat secret", "erin", dedup=False)
    store = memory._retrieval.parts.store
    assert store.get_by_rowids([s.rowid for s in ranking.scored]).keys() == {
        s.rowid for s in ranking.scored
    }  # the purged row's key is erin's now
    assert await _top(memory, ranking) == ["sailing boats at sea"]


async def test_a_memory_forgotten_between_the_text_search_and_the_ranking_is_not_returned(
    memory: HierarchicalMemory,
) -> None:
    """recall runs BM25 while the query is embedded, and ranks after: a text hit may be
    forgotten before its row is read for the ranking (both stores: PostgreSQL's one read
    comes after the forget, SQLite's re-read too)."""
    added = await memory.add_many([
        MemoryDraft("sailing boats on the lake", "dave", dedup=False),
        MemoryDraft("sailing boats at sea", "dave", dedup=False),
    ])
    retrieval = memory._retrieval
    preset = retrieval.preset
    common = await retrieval.executors.read(
        lambda: retrieval._common_terms("sailing boats", "dave", preset))
    text_hits = await retrieval.executors.read(lambda: retrieval._text_hits(
        "sailing boats", Scope("dave"), 3, None, [], preset, common))
    assert len(text_hits) == 2
    await memory.forget(added[0].id, user_id="dave")
    vector = await memory.embed_query("sailing boats")
    ranking: Ranking = await retrieval.executors.read(lambda: retrieval._ranked(
        "sailing boats", Scope("dave"), 3, None, NOW, preset, vector, common,
        searched=([], text_hits)))
    assert await _top(memory, ranking) == ["sailing boats at sea"]
