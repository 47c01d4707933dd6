"""`MemoryStore.candidates` for PostgreSQL as one statement: what ranking weighs of each candidate
(its columns and embedding), as the SQLite store reads it, and the rest of each row, kept as read
so the few memories recall returns are built from this read instead of a second round trip
(`CandidateRows.memories`). Results come in binary (`PgDatabase.fetchall`): the embeddings are
most of the bytes, and hex-decoding them was most of the read.

Building the returned memories from the same read is what the SQLite store's re-read checks for
(`Ranking.top`): one snapshot holds the weighed columns and the memory, so the two cannot differ,
and a row closed or purged before this read is not current in it or not in it at all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from ...candidates import CandidateRows, from_micros
from ...models import Memory
from ..store_shared import row_to_memory
from .connection import PgDatabase
from .deferred import DeferredWrites


class _Store(Protocol):
    """What of `PostgresMemoryStore` the read needs (the store imports this module)."""

    db: PgDatabase
    deferred: DeferredWrites


__all__ = ["read_candidates"]


# The rest of a memory, as one JSON array per row: loading two dozen columns of ~90 rows costs
# more than the read itself, and only the few returned rows are parsed (times as epoch micros).
_REST = ("id", "agent_id", "turn_id", "entity_refs", "metadata", "supersedes", "superseded_by",
         "access_count", "embedding_model")
_REST_TIMES = ("valid_until", "forgotten_at", "last_accessed")


def _micros(column: str) -> str:
    return f"(extract(epoch FROM {column}) * 1000000)::int8"


_CANDIDATES = (
    "SELECT rid, user_id, session_id, scope_key, category, content, importance,"
    f" {_micros('created_at')}, {_micros('valid_from')},"
    " valid_until IS NULL AND forgotten_at IS NULL, embedding,"
    f" json_build_array({', '.join(_REST)}, {', '.join(map(_micros, _REST_TIMES))})::text"
    " FROM memories WHERE rid = ANY(%s)"
)
_WEIGHED = 11  # the columns `CandidateRows.from_rows` reads; the JSON array follows


def read_candidates(store: _Store, rowids: Sequence[int]) -> CandidateRows:
    """The candidates among `rowids` that exist (in no particular order, each once)."""
    rows: list[tuple[Any, ...]] = []
    if rowids:
        store.deferred.flush("memories")
        rows = store.db.fetchall(_CANDIDATES, ([int(r) for r in rowids],), binary=True)
    by_rowid = {int(row[0]): row for row in rows}

    def load(wanted: Sequence[int]) -> dict[int, Memory]:
        return {rid: _memory(by_rowid[rid]) for rid in wanted if rid in by_rowid}

    return CandidateRows.from_rows([row[:_WEIGHED] for row in rows], load)


def _memory(row: tuple[Any, ...]) -> Memory:
    values = json.loads(row[_WEIGHED])
    named: dict[str, Any] = dict(zip(_REST, values, strict=False))
    named.update(zip(_REST_TIMES, map(_time, values[len(_REST):]), strict=True))
    named.update(user_id=row[1], session_id=row[2], category=row[4], content=row[5],
                 importance=row[6], created_at=_time(row[7]), valid_from=_time(row[8]))
    return row_to_memory(named, _as_is)


def _time(us: int | None) -> datetime | None:
    return None if us is None else from_micros(us)


def _as_is(value: datetime | None) -> datetime | None:
    return value
