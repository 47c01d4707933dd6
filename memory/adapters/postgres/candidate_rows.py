"""`MemoryStore.candidates` for PostgreSQL as one statement: what ranking weighs of each candidate
(its columns and embedding), as the SQLite store reads it, instead of whole memories and then
their embeddings in a second round trip. Whole memories are built only for the rows returned
(`CandidateRows.memories`, through the store's `get_by_rowids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ...candidates import CandidateRows
from ...models import Memory
from .connection import PgDatabase
from .deferred import DeferredWrites


class _Store(Protocol):
    """What of `PostgresMemoryStore` the read needs (the store imports this module)."""

    db: PgDatabase
    deferred: DeferredWrites

    def get_by_rowids(self, rowids: Sequence[int]) -> dict[int, Memory]: ...

__all__ = ["read_candidates"]

# Times as integer microseconds since the epoch (extract gives an exact numeric).
_CANDIDATES = (
    "SELECT rid, user_id, session_id, scope_key, category, content, importance,"
    " (extract(epoch FROM created_at) * 1000000)::int8,"
    " (extract(epoch FROM valid_from) * 1000000)::int8,"
    " valid_until IS NULL AND forgotten_at IS NULL, embedding"
    " FROM memories WHERE rid = ANY(%s)"
)


def read_candidates(store: _Store, rowids: Sequence[int]) -> CandidateRows:
    """The candidate columns of `rowids` that exist (in no particular order, each once); whole
    memories of some of them on demand through `store.get_by_rowids`."""
    rows: list[tuple[object, ...]] = []
    if rowids:
        store.deferred.flush("memories")
        rows = store.db.fetchall(_CANDIDATES, ([int(r) for r in rowids],))
    return CandidateRows.from_rows(rows, store.get_by_rowids)
