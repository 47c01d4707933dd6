"""In-memory fakes of the ports, for fast unit tests of logic and as the reference implementation
the contract suites (tests/contracts/) run beside SQLite. The real adapters (MiniLM, sqlite-vec,
FTS5) still run in those contract tests and in every end-to-end test.

`FakeDatabase` plays the role the SQLite file plays for its adapter family: the store and both
indexes keep their tables in one, so a `store.transaction()` commits or rolls back all of them at
once, and a transaction's writes stay invisible to other threads until it commits.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from headroom.memory.adapters.sqlite_store import normalize_content
from headroom.memory.candidates import CandidateRows
from headroom.memory.errors import ConfigError
from headroom.memory.models import Memory, MemoryCategory, MemoryFilter, as_utc, utcnow

__all__ = [
    "FakeDatabase",
    "FakeEmbedder",
    "FakeMemoryCache",
    "FakeMemoryStore",
    "FakeTextIndex",
    "FakeVectorIndex",
]

_WORD = re.compile(r"\w+")
_SCOPE_COLUMNS = ("session_id", "agent_id", "turn_id")
# What `MemoryStore.save` writes back; content, times of creation and the chain's back link stay.
_SAVED_FIELDS = (
    *_SCOPE_COLUMNS, "category", "importance", "entity_refs", "metadata", "valid_until",
    "superseded_by", "forgotten_at", "access_count", "last_accessed",
)


class FakeEmbedder:
    """Deterministic bag-of-words hashing: texts sharing words are close. Counts its calls."""

    def __init__(self, dimension: int = 64, model_id: str = "fake:bow-64") -> None:
        self._dimension = dimension
        self.model_id = model_id
        self.calls: list[list[str]] = []
        self.fail_with: Exception | None = None

    @property
    def dimension(self) -> int:
        return self._dimension

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):  # the real embedders refuse it too (see _common.text_list)
            raise TypeError("embed() takes a sequence of strings, not a single string")
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self._dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                h = int.from_bytes(hashlib.md5(word.encode()).digest()[:4], "little")
                out[i, h % self._dimension] += 1.0
            norm = np.linalg.norm(out[i])
            if norm == 0:
                out[i, 0] = 1.0
            else:
                out[i] /= norm
        return out


# --- storage: one transactional set of tables shared by the store and the indexes ------------


class FakeDatabase:
    """Named tables with SQLite's transaction shape: one writer at a time, readers see the last
    commit. A transaction works on a deep copy that replaces the committed tables on success."""

    def __init__(self) -> None:
        self._committed: dict[str, Any] = {}
        self._writer = threading.RLock()
        self._local = threading.local()

    def define(self, name: str, factory: Callable[[], Any]) -> None:
        with self._writer:
            if name not in self._committed:
                self._committed = {**self._committed, name: factory()}

    def tables(self) -> dict[str, Any]:
        """This thread's view: its open transaction's copy, else the last committed state."""
        work = getattr(self._local, "work", None)
        return self._committed if work is None else work

    @contextmanager
    def transaction(self) -> Iterator[dict[str, Any]]:
        work = getattr(self._local, "work", None)
        if work is not None:  # nested: join the outer transaction, as SQLite's adapter does
            yield work
            return
        with self._writer:
            self._local.work = copy.deepcopy(self._committed)
            try:
                yield self._local.work
            except BaseException:
                self._local.work = None
                raise
            self._committed, self._local.work = self._local.work, None


def _visible(memory: Memory, flt: MemoryFilter) -> bool:
    """`MemoryFilter`'s documented semantics, written out independently of the SQL version."""
    if memory.user_id != flt.user_id:
        return False
    for column in _SCOPE_COLUMNS:
        mine, wanted = getattr(memory, column), getattr(flt, column)
        if flt.all_scopes:
            if wanted is not None and mine != wanted:
                return False
        elif mine is not None and mine != wanted:  # a request sees its level and broader ones
            return False
    if flt.as_of is not None:
        if not memory.valid_at(flt.as_of):
            return False
    elif not flt.include_superseded and not memory.is_current:
        return False
    if flt.categories and memory.category not in flt.categories:
        return False
    if flt.min_importance is not None and memory.importance < flt.min_importance:
        return False
    if flt.created_after is not None and memory.created_at < flt.created_after:
        return False
    return flt.created_before is None or memory.created_at < flt.created_before


def _jsonish(value: Any) -> Any:
    """What a JSON column gives back (the SQLite store writes events with default=str)."""
    return None if value is None else json.loads(json.dumps(value, default=str))


class FakeMemoryStore:
    """Implements `MemoryStore` with dicts. Rows keep their embedding beside them, as the
    `memories` table does; every Memory handed in or out is a copy."""

    def __init__(self, db: FakeDatabase | None = None) -> None:
        self.db = db or FakeDatabase()
        for name, factory in (
            ("rows", dict), ("embeddings", dict), ("events", list), ("outbox", dict),
            ("settings", dict), ("sequences", Counter),
        ):
            self.db.define(name, factory)

    def transaction(self) -> AbstractContextManager[Any]:
        return self.db.transaction()

    def _rows(self) -> dict[int, Memory]:
        return self.db.tables()["rows"]

    def _next(self, tables: dict[str, Any], sequence: str) -> int:
        tables["sequences"][sequence] += 1
        return int(tables["sequences"][sequence])

    def _find(self, memory_id: str) -> tuple[int, Memory] | None:
        return next(((r, m) for r, m in self._rows().items() if m.id == memory_id), None)

    # --- rows -------------------------------------------------------------------------------

    def insert(self, memory: Memory) -> int:
        stored = copy.deepcopy(memory)
        for name in ("created_at", "valid_from", "valid_until", "forgotten_at", "last_accessed"):
            value = getattr(stored, name)
            if value is not None:
                setattr(stored, name, as_utc(value))
        embedding, stored.embedding = stored.embedding, None
        with self.db.transaction() as tables:
            if any(m.id == stored.id for m in tables["rows"].values()):
                raise ValueError(f"memory {stored.id!r} exists")
            rid = self._next(tables, "rows")
            tables["rows"][rid] = stored
            if embedding is not None:
                tables["embeddings"][rid] = np.asarray(embedding, dtype=np.float32)
        return rid

    def save(self, memory: Memory) -> None:
        with self.db.transaction():
            found = self._find(memory.id)
            if found is not None:
                row = found[1]
                for name in _SAVED_FIELDS:
                    value = copy.deepcopy(getattr(memory, name))
                    setattr(row, name, as_utc(value) if isinstance(value, datetime) else value)

    def touch(self, memory_ids: Sequence[str], when: datetime) -> None:
        with self.db.transaction():
            for memory_id in memory_ids:
                found = self._find(memory_id)
                if found is not None:
                    found[1].access_count += 1
                    found[1].last_accessed = as_utc(when)

    def get(self, memory_id: str) -> Memory | None:
        found = self._find(memory_id)
        return None if found is None else copy.deepcopy(found[1])

    def rowid_of(self, memory_id: str) -> int | None:
        found = self._find(memory_id)
        return None if found is None else found[0]

    def get_by_rowids(self, rowids: Sequence[int]) -> dict[int, Memory]:
        rows = self._rows()
        return {int(r): copy.deepcopy(rows[int(r)]) for r in rowids if int(r) in rows}

    def get_embedding(self, memory_id: str) -> np.ndarray | None:
        rid = self.rowid_of(memory_id)
        vector = None if rid is None else self.db.tables()["embeddings"].get(rid)
        return None if vector is None else vector.copy()

    def embeddings_by_rowids(self, rowids: Sequence[int]) -> dict[int, np.ndarray]:
        vectors = self.db.tables()["embeddings"]
        return {int(r): vectors[int(r)].copy() for r in rowids if int(r) in vectors}

    def candidates(self, rowids: Sequence[int]) -> CandidateRows:
        return CandidateRows.of(self.get_by_rowids(rowids), self.embeddings_by_rowids(rowids))

    def _selected(self, flt: MemoryFilter) -> list[tuple[int, Memory]]:
        """Rows `flt` selects, newest first (created_at, then insertion order)."""
        hits = [(r, m) for r, m in self._rows().items() if _visible(m, flt)]
        return sorted(hits, key=lambda hit: (hit[1].created_at, hit[0]), reverse=True)

    def query(self, flt: MemoryFilter) -> list[Memory]:
        hits = self._selected(flt)[flt.offset :]
        if flt.limit is not None:
            hits = hits[: flt.limit]
        return [copy.deepcopy(m) for _, m in hits]

    def count(self, flt: MemoryFilter, *, cap: int | None = None) -> int:
        n = len(self._selected(flt))
        return n if cap is None else min(n, cap)

    def recent_contents(self, user_id: str, limit: int) -> list[str]:
        mine = [
            (m.created_at, r, m.content)
            for r, m in self._rows().items()
            if m.user_id == user_id and m.is_current
        ]
        return [content for *_, content in sorted(mine, reverse=True)[:limit]]

    def find_current_by_content(self, user_id: str, content: str) -> Memory | None:
        key = normalize_content(content)
        for _, memory in sorted(self._rows().items()):
            if memory.user_id == user_id and memory.is_current:
                if normalize_content(memory.content) == key:
                    return copy.deepcopy(memory)
        return None

    def chain(self, memory_id: str) -> list[Memory]:
        start = self.get(memory_id)
        if start is None:
            return []
        out, seen = [start], {start.id}
        for link, prepend in (("supersedes", True), ("superseded_by", False)):
            cursor = start
            while (next_id := getattr(cursor, link)) and next_id not in seen:
                found = self.get(next_id)
                if found is None:
                    break
                seen.add(found.id)
                out.insert(0, found) if prepend else out.append(found)
                cursor = found
        return out

    def embeddings_as_of(self, flt: MemoryFilter) -> list[tuple[int, np.ndarray]]:
        vectors = self.db.tables()["embeddings"]
        return [(r, vectors[r].copy()) for r, _ in self._selected(flt) if r in vectors]

    def iter_all(self, user_id: str | None = None) -> Iterator[Memory]:
        tables = self.db.tables()
        for rid, memory in sorted(tables["rows"].items()):
            if user_id is None or memory.user_id == user_id:
                out = copy.deepcopy(memory)
                vector = tables["embeddings"].get(rid)
                out.embedding = None if vector is None else vector.tolist()
                yield out

    # --- audit trail ------------------------------------------------------------------------

    def record_event(
        self, memory_id: str, user_id: str, op: str, *, old: Any = None, new: Any = None,
        request_id: str | None = None, at: datetime | None = None,
    ) -> None:
        event = {
            "memory_id": memory_id, "user_id": user_id, "op": op,
            "at": as_utc(at) if at is not None else utcnow(), "request_id": request_id,
            "old": _jsonish(old), "new": _jsonish(new),
        }
        with self.db.transaction() as tables:
            tables["events"].append(event)

    def events(self, memory_id: str) -> list[dict[str, Any]]:
        return [
            {key: e[key] for key in ("op", "at", "request_id", "old", "new")}
            for e in self.db.tables()["events"]
            if e["memory_id"] == memory_id
        ]

    # --- outbox and settings ----------------------------------------------------------------

    def outbox_put(self, payload: dict[str, Any]) -> int:
        with self.db.transaction() as tables:
            outbox_id = self._next(tables, "outbox")
            tables["outbox"][outbox_id] = _jsonish(payload)
        return outbox_id

    def outbox_pending(self, limit: int) -> list[tuple[int, dict[str, Any]]]:
        return [(i, copy.deepcopy(p)) for i, p in sorted(self.db.tables()["outbox"].items())][
            :limit
        ]

    def outbox_done(self, ids: Sequence[int]) -> None:
        with self.db.transaction() as tables:
            for outbox_id in ids:
                tables["outbox"].pop(int(outbox_id), None)

    def outbox_size(self) -> int:
        return len(self.db.tables()["outbox"])

    def get_setting(self, key: str) -> str | None:
        return self.db.tables()["settings"].get(key)

    def set_setting(self, key: str, value: str) -> None:
        with self.db.transaction() as tables:
            tables["settings"][key] = value

    # --- purge and stats --------------------------------------------------------------------

    def purge(self, flt: MemoryFilter) -> tuple[list[int], dict[str, int]]:
        wanted = {c: getattr(flt, c) for c in _SCOPE_COLUMNS}
        everything = MemoryFilter(
            user_id=flt.user_id, all_scopes=True, include_superseded=True, limit=None, **wanted
        )
        with self.db.transaction() as tables:
            doomed = dict(self._selected(everything))
            ids = {m.id for m in doomed.values()}
            whole_user = all(v is None for v in wanted.values())
            kept_events = [
                e for e in tables["events"]
                if not (e["user_id"] == flt.user_id if whole_user else e["memory_id"] in ids)
            ]
            events = len(tables["events"]) - len(kept_events)
            tables["events"][:] = kept_events
            queued = [
                i for i, p in tables["outbox"].items()
                if p["scope"]["user_id"] == flt.user_id
                and all(v is None or p["scope"].get(c) == v for c, v in wanted.items())
            ]
            for outbox_id in queued:
                del tables["outbox"][outbox_id]
            for rid in doomed:
                del tables["rows"][rid]
                tables["embeddings"].pop(rid, None)
        return sorted(doomed), {"memories": len(doomed), "events": events, "outbox": len(queued)}

    def checkpoint(self) -> None:
        """Nothing outlives a purge here: there is no journal."""

    def stats(self, user_id: str | None = None) -> dict[str, Any]:
        rows = [m for m in self._rows().values() if user_id is None or m.user_id == user_id]
        current = [m for m in rows if m.is_current]

        def grouped(key: Callable[[Memory], str]) -> dict[str, int]:
            return dict(Counter(key(m) for m in current).most_common())

        by_scope = grouped(lambda m: m.scope_level.value)
        return {
            "total": len(current),
            "current": len(current),
            "superseded": sum(1 for m in rows if not m.is_current and m.forgotten_at is None),
            "forgotten": sum(1 for m in rows if m.forgotten_at is not None),
            "rows": len(rows),
            "categories": grouped(lambda m: m.category.value),
            "scopes": {lvl: by_scope.get(lvl, 0) for lvl in ("user", "session", "agent", "turn")},
            "users": grouped(lambda m: m.user_id) if user_id is None else {user_id: len(current)},
            "outbox_pending": self.outbox_size(),
        }


# --- indexes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    scope_key: str
    category: MemoryCategory
    value: Any  # a vector, or a text's word counts


class _PartitionedTable:
    """Entries partitioned by user, so a search reads one user's partition and nothing else."""

    def __init__(self, db: FakeDatabase, name: str) -> None:
        self.db = db
        self.name = name
        db.define(name, lambda: {"by_user": {}, "owner": {}})

    def put(self, rowid: int, user_id: str, entry: _Entry) -> None:
        with self.db.transaction() as tables:
            table = tables[self.name]
            if rowid in table["owner"]:
                raise ValueError(f"rowid {rowid} is already indexed")
            table["owner"][rowid] = user_id
            table["by_user"].setdefault(user_id, {})[rowid] = entry

    def remove(self, rowids: Sequence[int]) -> None:
        with self.db.transaction() as tables:
            table = tables[self.name]
            for rowid in rowids:
                user_id = table["owner"].pop(int(rowid), None)
                if user_id is not None:
                    del table["by_user"][user_id][int(rowid)]

    def partition(
        self, user_id: str, scope_keys: Sequence[str] | None,
        categories: Sequence[MemoryCategory] | None,
    ) -> list[tuple[int, Any]]:
        entries = self.db.tables()[self.name]["by_user"].get(user_id, {})
        return [
            (rowid, e.value)
            for rowid, e in entries.items()
            if (scope_keys is None or e.scope_key in scope_keys)
            and (not categories or e.category in categories)
        ]

    def count(self, user_id: str | None) -> int:
        table = self.db.tables()[self.name]
        if user_id is None:
            return len(table["owner"])
        return len(table["by_user"].get(user_id, {}))


class FakeVectorIndex:
    """Implements `VectorIndex` by brute-force cosine over the user's partition (numpy)."""

    def __init__(self, db: FakeDatabase | None = None, dimension: int = 64) -> None:
        self.dimension = dimension
        self._table = _PartitionedTable(db or FakeDatabase(), "vectors")

    def add(
        self, rowid: int, user_id: str, scope_key: str, category: MemoryCategory,
        embedding: np.ndarray,
    ) -> None:
        vector = np.array(embedding, dtype=np.float32)
        if vector.shape != (self.dimension,):
            raise ConfigError(
                f"embedding has dimension {vector.shape}, the index expects {self.dimension}"
            )
        self._table.put(int(rowid), user_id, _Entry(scope_key, category, vector))

    def remove(self, rowids: Sequence[int]) -> None:
        self._table.remove(rowids)

    def search(
        self, embedding: np.ndarray, user_id: str, *, scope_keys: Sequence[str] | None,
        categories: Sequence[MemoryCategory] | None, k: int,
    ) -> list[tuple[int, float]]:
        candidates = self._table.partition(user_id, scope_keys, categories)
        if k <= 0 or not candidates:
            return []
        matrix = np.stack([v for _, v in candidates])
        query = np.asarray(embedding, dtype=np.float32)
        norms = np.maximum(np.linalg.norm(matrix, axis=1) * np.linalg.norm(query), 1e-12)
        sims = matrix @ query / norms
        order = np.argsort(-sims, kind="stable")[:k]
        return [(candidates[i][0], float(sims[i])) for i in order]

    def count(self, user_id: str | None = None) -> int:
        return self._table.count(user_id)


def _words(text: str) -> list[str]:
    return [w.casefold() for w in _WORD.findall(text)]


class FakeTextIndex:
    """Implements `TextIndex` with Okapi BM25 (k1=1.2, b=0.75) over the user's partition. Query
    text is only ever split into words, never read as query syntax."""

    K1 = 1.2
    B = 0.75

    def __init__(self, db: FakeDatabase | None = None) -> None:
        self._table = _PartitionedTable(db or FakeDatabase(), "text")

    def add(
        self, rowid: int, user_id: str, scope_key: str, category: MemoryCategory, content: str
    ) -> None:
        self._table.put(int(rowid), user_id, _Entry(scope_key, category, Counter(_words(content))))

    def remove(self, rowids: Sequence[int]) -> None:
        self._table.remove(rowids)

    def search(
        self, query: str, user_id: str, *, scope_keys: Sequence[str] | None,
        categories: Sequence[MemoryCategory] | None, k: int,
    ) -> list[tuple[int, float]]:
        terms = list(dict.fromkeys(_words(query)))
        docs = self._table.partition(user_id, scope_keys, categories)
        if not terms or not docs or k <= 0:
            return []
        average = sum(sum(c.values()) for _, c in docs) / len(docs) or 1.0
        idf = {}
        for term in terms:
            n = sum(1 for _, c in docs if term in c)
            idf[term] = math.log(1 + (len(docs) - n + 0.5) / (n + 0.5))
        scored = []
        for rowid, counts in docs:
            norm = self.K1 * (1 - self.B + self.B * sum(counts.values()) / average)
            score = sum(
                idf[t] * counts[t] * (self.K1 + 1) / (counts[t] + norm)
                for t in terms
                if t in counts
            )
            if score > 0:
                scored.append((rowid, score))
        scored.sort(key=lambda hit: -hit[1])
        return scored[:k]

    def optimize(self) -> None:
        """Nothing to merge."""

    def count(self, user_id: str | None = None) -> int:
        return self._table.count(user_id)


class FakeMemoryCache:
    """Implements `MemoryCache` with a dict in recency order; copies in and out."""

    def __init__(self, max_size: int = 1000) -> None:
        self.max_size = max_size
        self._items: dict[str, Memory] = {}
        self._lock = threading.Lock()

    def get(self, memory_id: str) -> Memory | None:
        with self._lock:
            memory = self._items.pop(memory_id, None)
            if memory is None:
                return None
            self._items[memory_id] = memory
            return copy.deepcopy(memory)

    def put(self, memory: Memory) -> None:
        with self._lock:
            self._items.pop(memory.id, None)
            if self.max_size > 0:
                self._items[memory.id] = copy.deepcopy(memory)
            while len(self._items) > self.max_size:
                del self._items[next(iter(self._items))]

    def invalidate(self, memory_id: str) -> None:
        with self._lock:
            self._items.pop(memory_id, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def record_submits(monkeypatch: Any, pool: Any, label: str, into: list[str]) -> None:
    """Append `label` to `into` whenever work is handed to the executor `pool`, then hand it
    on: which thread pools a path uses, and in what order."""
    submit = pool.submit

    def spy(fn: Any, *args: Any, **kwargs: Any) -> Any:
        into.append(label)
        return submit(fn, *args, **kwargs)

    monkeypatch.setattr(pool, "submit", spy)
