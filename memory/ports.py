"""The seams the spec names, as `typing.Protocol`s. `HierarchicalMemory` receives implementations;
`HierarchicalMemory.create(config)` wires the SQLite / sqlite-vec / FTS5 / local-embedding defaults.

The ports are synchronous on purpose: storage and model calls block, so the facade runs each
whole operation (store + vector + text index, in one transaction) on a worker thread, never on
the event loop. Adapters of the SQLite family share one connection per thread, so a write that
touches all three indexes commits or rolls back as one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .candidates import CandidateRows
from .models import Memory, MemoryCategory, MemoryFilter, VectorFilter

__all__ = [
    "ClaimedRow",
    "DeadLetter",
    "Embedder",
    "MemoryCache",
    "MemoryFilter",
    "MemoryStore",
    "Outbox",
    "TextIndex",
    "VectorFilter",
    "VectorIndex",
]


@runtime_checkable
class MemoryStore(Protocol):
    """Rows, supersession, the audit trail, purge and stats (the queue is the `Outbox` port)."""

    def transaction(self) -> AbstractContextManager[None]: ...

    def insert(self, memory: Memory) -> int:
        """Store a new row; returns its integer row key (the key the indexes use)."""
        ...

    def get(self, memory_id: str) -> Memory | None: ...

    def get_by_rowids(self, rowids: Sequence[int]) -> dict[int, Memory]: ...

    def rowid_of(self, memory_id: str) -> int | None: ...

    def save(self, memory: Memory) -> None:
        """Write back mutable fields: importance, metadata, entity refs, scope, access, validity."""
        ...

    def query(self, flt: MemoryFilter) -> list[Memory]: ...

    def count(self, flt: MemoryFilter, *, cap: int | None = None) -> int:
        """The rows `flt` matches (`limit` aside); with `cap`, at most `cap` of them are
        counted, so asking whether a user's window holds more than n reads n + 1 rows."""
        ...

    def touch(self, memory_ids: Sequence[str], when: datetime) -> None:
        """Record an access (recall hit): access_count + 1, last_accessed."""
        ...

    def get_embedding(self, memory_id: str) -> np.ndarray | None: ...

    def embeddings_by_rowids(self, rowids: Sequence[int]) -> dict[int, np.ndarray]:
        """Stored embeddings of these rows (the ranker's exact cosines for non-vector hits)."""
        ...

    def candidates(self, rowids: Sequence[int]) -> CandidateRows:
        """What recall weighs of these rows, column by column, with their embeddings; the full
        memories only on demand (`CandidateRows.memories`). Rows that do not exist are left
        out; any user's rows (context neighbours are checked by the caller)."""
        ...

    def recent_contents(self, user_id: str, limit: int) -> list[str]:
        """The text of the user's `limit` newest current memories (any scope)."""
        ...

    def find_current_by_content(self, user_id: str, content: str) -> Memory | None: ...

    def chain(self, memory_id: str) -> list[Memory]:
        """The whole supersession chain through `memory_id`, oldest first."""
        ...

    def embeddings_as_of(
        self, flt: MemoryFilter
    ) -> list[tuple[int, np.ndarray]]:
        """Stored embeddings of the memories `flt` selects (for history / as-of semantic reads)."""
        ...

    def record_event(
        self, memory_id: str, user_id: str, op: str, *, old: Any = None, new: Any = None,
        request_id: str | None = None, at: datetime | None = None,
    ) -> None: ...

    def events(self, memory_id: str) -> list[dict[str, Any]]: ...

    def get_setting(self, key: str) -> str | None: ...

    def set_setting(self, key: str, value: str) -> None: ...

    def purge(self, flt: MemoryFilter) -> tuple[list[int], dict[str, int]]:
        """Hard-delete every row `flt` selects (all_scopes semantics) with its events and outbox
        entries; returns the deleted row keys (for the indexes) and counts per table."""
        ...

    def checkpoint(self) -> None:
        """After a purge, outside its transaction: leave no older copy of deleted data in a
        journal or log (a no-op where storage has none)."""
        ...

    def stats(self, user_id: str | None = None) -> dict[str, Any]: ...

    def iter_all(self, user_id: str | None = None) -> Iterator[Memory]: ...


@runtime_checkable
class VectorIndex(Protocol):
    """Holds the vectors of *current* memories only, partitioned by user."""

    dimension: int

    def add(
        self, rowid: int, user_id: str, scope_key: str, category: MemoryCategory,
        embedding: np.ndarray,
    ) -> None: ...

    def remove(self, rowids: Sequence[int]) -> None: ...

    def search(
        self, embedding: np.ndarray, user_id: str, *, scope_keys: Sequence[str] | None,
        categories: Sequence[MemoryCategory] | None, k: int,
    ) -> list[tuple[int, float]]:
        """(rowid, cosine similarity), best first; user and scope are pre-filters."""
        ...

    def count(self, user_id: str | None = None) -> int: ...


@runtime_checkable
class TextIndex(Protocol):
    """Full-text (BM25) over *current* memories only, partitioned by user."""

    def add(
        self, rowid: int, user_id: str, scope_key: str, category: MemoryCategory, content: str
    ) -> None: ...

    def remove(self, rowids: Sequence[int]) -> None: ...

    def search(
        self, query: str, user_id: str, *, scope_keys: Sequence[str] | None,
        categories: Sequence[MemoryCategory] | None, k: int,
    ) -> list[tuple[int, float]]:
        """(rowid, BM25 relevance where higher is better), best first."""
        ...

    def optimize(self) -> None:
        """Maintenance after bulk writes (a no-op where there is nothing to do)."""
        ...

    def count(self, user_id: str | None = None) -> int: ...


@runtime_checkable
class Embedder(Protocol):
    model_id: str

    @property
    def dimension(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """An (n, dimension) float32 array of L2-normalised vectors."""
        ...


@runtime_checkable
class MemoryCache(Protocol):
    def get(self, memory_id: str) -> Memory | None: ...

    def put(self, memory: Memory) -> None: ...

    def invalidate(self, memory_id: str) -> None: ...

    def clear(self) -> None: ...

    def __len__(self) -> int: ...


ClaimedRow = tuple[int, dict[str, Any], int]
"""(outbox id, payload, attempts so far) as `Outbox.claim` hands it out."""


@dataclass(frozen=True)
class DeadLetter:
    """An outbox row parked after it kept failing, kept whole to be inspected or re-driven."""

    id: int
    outbox_id: int
    user_id: str
    payload: dict[str, Any]
    attempts: int
    error: str
    created_at: datetime
    dead_at: datetime


@runtime_checkable
class Outbox(Protocol):
    """Durable queue of write ops between the request path and the writer.

    A row is handed to one owner at a time: `claim` leases rows for `lease_s` seconds, and a row
    comes back only once its lease has run out (its worker died or hung) or `fail` released it.
    `owner` must be unique per worker (e.g. host, pid and a random suffix). `complete` and
    `dead_letter` run inside the store's write transaction, on the store's thread, so applying a
    row and removing it commit or roll back as one.
    """

    def put(self, payload: dict[str, Any]) -> int:
        """Queue one payload (its `scope.user_id`, if any, is kept for purge); returns its id."""
        ...

    def claim(self, limit: int, owner: str, lease_s: float) -> list[ClaimedRow]:
        """Lease up to `limit` free rows, oldest first, to `owner`. Atomic: no row is ever held
        by two owners while its lease is valid."""
        ...

    def complete(self, outbox_id: int, owner: str) -> bool:
        """Delete the row if `owner` still holds it. False means another worker re-claimed it
        after our lease ran out (or it is gone): roll back whatever was applied for it."""
        ...

    def fail(
        self, outbox_id: int, owner: str, error: str, *, retry_after_s: float = 0.0
    ) -> bool:
        """Record a failed attempt (attempts + 1, last_error) and release the lease; the row is
        offered again after `retry_after_s`. False if `owner` no longer held it."""
        ...

    def dead_letter(self, outbox_id: int, error: str) -> bool:
        """Move the row, with its payload, to the dead letters (counting this failure as an
        attempt); False if there was no such row."""
        ...

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Parked rows, oldest first."""
        ...

    def redrive(self, ids: Sequence[int] | None = None) -> int:
        """Queue these dead letters again (all of them when `ids` is None) as new rows with no
        attempts; returns how many were moved."""
        ...

    def size(self) -> int:
        """Rows queued (claimed or not), dead letters excluded."""
        ...

    def dead_count(self) -> int: ...
