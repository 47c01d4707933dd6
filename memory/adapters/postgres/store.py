"""The PostgreSQL `MemoryStore`: rows, the audit trail, settings, purge with counts, and stats,
with the semantics of the SQLite store (memory/adapters/sqlite_store.py) statement for statement.

A memory's row, index rows and audit event wait in `DeferredWrites` (deferred.py) until the
write transaction needs them, and go as one statement per table. A write batch's dedup lookups
(`find_current_by_contents`) are one statement for the whole batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import numpy as np

from ...models import Memory, MemoryFilter
from .. import store_shared as shared
from ..store_shared import COLUMNS as _COLUMNS
from ..store_shared import Dialect, normalize_content
from .candidate_rows import read_candidates
from .connection import PgDatabase
from .deferred import BulkInsert, DeferredWrites, deferred_writes
from .outbox import PostgresOutbox

__all__ = ["DeferredWrites", "PostgresMemoryStore", "deferred_writes", "where_clause"]

_VACUUMED = ("memories", "memory_events", "outbox", "outbox_dead", "memory_text", "memory_vectors")
_PAGE = 1000  # rows per round trip when iterating everything
_ROW_COLUMNS = (
    "id, user_id, session_id, agent_id, turn_id, scope_key, content, content_norm, category,"
    " importance, entity_refs, metadata, created_at, valid_from, valid_until, supersedes,"
    " superseded_by, forgotten_at, access_count, last_accessed, embedding, embedding_model"
)
_ROW_MARKS = ", ".join(["%s"] * 22)
_ROW_TYPES = (
    "text", "text", "text", "text", "text", "text", "text", "text", "text", "float8", "text",
    "text", "timestamptz", "timestamptz", "timestamptz", "text", "text", "timestamptz", "int8",
    "timestamptz", "bytea", "text",
)
_INSERT_ROWS = BulkInsert(
    "memories", ("rid", *(c.strip() for c in _ROW_COLUMNS.split(","))), ("int8", *_ROW_TYPES)
)
_INSERT_EVENTS = BulkInsert(
    "memory_events", ("memory_id", "user_id", "op", "at", "request_id", "old", "new"),
    ("text", "text", "text", "timestamptz", "text", "text", "text"),
)
_INSERT_RETURNING = f"INSERT INTO memories ({_ROW_COLUMNS}) VALUES ({_ROW_MARKS}) RETURNING rid"


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _row_to_memory(row: dict[str, Any]) -> Memory:
    return shared.row_to_memory(row, _utc)


def _vector(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(bytes(blob), dtype=np.float32)


def _any(column: str, values: list[Any]) -> tuple[str, list[Any]]:
    return f"{column} = ANY(%s)", [values]


def _as_is(value: datetime) -> datetime:
    return value  # psycopg sends aware datetimes as timestamptz


_POSTGRES = Dialect(mark="%s", one_of=_any, time=_as_is)


def where_clause(flt: MemoryFilter) -> tuple[str, list[Any]]:
    """SQL conditions for a filter, in PostgreSQL's spelling (see store_shared.where_clause)."""
    return shared.where_clause(flt, _POSTGRES)


class PostgresMemoryStore:
    def __init__(self, db: PgDatabase) -> None:
        self.db = db
        self.outbox = PostgresOutbox(db)
        self.deferred = deferred_writes(db)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction; its deferred statements are sent before COMMIT."""
        with self.db.transaction(), self.deferred.collecting():
            yield

    # --- settings ---------------------------------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        return self.db.scalar("SELECT value FROM settings WHERE key = %s", (key,))  # type: ignore[no-any-return]

    def set_setting(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO settings(key, value) VALUES (%s, %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # --- rows -------------------------------------------------------------------------------

    def insert(self, memory: Memory) -> int:
        self.db.lock_user(memory.user_id)
        embedding = (
            None
            if memory.embedding is None
            else np.asarray(memory.embedding, dtype=np.float32).tobytes()
        )
        values = (
            memory.id, memory.user_id, memory.session_id, memory.agent_id, memory.turn_id,
            memory.scope.key, memory.content, normalize_content(memory.content),
            memory.category.value, memory.importance, json.dumps(memory.entity_refs),
            json.dumps(memory.metadata), _utc(memory.created_at), _utc(memory.valid_from),
            _utc(memory.valid_until), memory.supersedes, memory.superseded_by,
            _utc(memory.forgotten_at), memory.access_count,
            _utc(memory.last_accessed), embedding, memory.embedding_model,
        )
        if self.deferred.collecting_now:
            rid = self.deferred.next_rid()
            self.deferred.defer_row(_INSERT_ROWS, memory.user_id, (rid, *values))
            return rid
        return int(self.db.scalar(_INSERT_RETURNING, values))

    def save(self, memory: Memory) -> None:
        self.db.lock_user(memory.user_id)
        self.deferred.flush("memories", memory.user_id)
        self.db.execute(
            "UPDATE memories SET session_id = %s, agent_id = %s, turn_id = %s, scope_key = %s,"
            " category = %s, importance = %s, entity_refs = %s, metadata = %s, valid_until = %s,"
            " superseded_by = %s, forgotten_at = %s, access_count = %s, last_accessed = %s"
            " WHERE id = %s",
            (
                memory.session_id, memory.agent_id, memory.turn_id, memory.scope.key,
                memory.category.value, memory.importance, json.dumps(memory.entity_refs),
                json.dumps(memory.metadata), _utc(memory.valid_until),
                memory.superseded_by, _utc(memory.forgotten_at), memory.access_count,
                _utc(memory.last_accessed), memory.id,
            ),
        )

    def touch(self, memory_ids: Sequence[str], when: datetime) -> None:
        if not memory_ids:
            return
        self.deferred.flush("memories")
        self.db.execute(
            "UPDATE memories SET access_count = access_count + 1, last_accessed = %s"
            " WHERE id = ANY(%s)",
            (_utc(when), list(memory_ids)),
        )

    def get(self, memory_id: str) -> Memory | None:
        self.deferred.flush("memories")
        row = self.db.fetchone(
            f"SELECT {_COLUMNS} FROM memories WHERE id = %s", (memory_id,), dicts=True
        )
        return None if row is None else _row_to_memory(row)

    def get_embedding(self, memory_id: str) -> np.ndarray | None:
        self.deferred.flush("memories")
        return _vector(self.db.scalar("SELECT embedding FROM memories WHERE id = %s", (memory_id,)))

    def embeddings_by_rowids(self, rowids: Sequence[int]) -> dict[int, np.ndarray]:
        if not rowids:
            return {}
        self.deferred.flush("memories")
        rows = self.db.fetchall(
            "SELECT rid, embedding FROM memories WHERE rid = ANY(%s) AND embedding IS NOT NULL",
            ([int(r) for r in rowids],),
        )
        return {int(rid): _vector(blob) for rid, blob in rows}  # type: ignore[misc]

    def rowid_of(self, memory_id: str) -> int | None:
        self.deferred.flush("memories")
        rid = self.db.scalar("SELECT rid FROM memories WHERE id = %s", (memory_id,))
        return None if rid is None else int(rid)

    def get_by_rowids(self, rowids: Sequence[int]) -> dict[int, Memory]:
        if not rowids:
            return {}
        self.deferred.flush("memories")
        rows = self.db.fetchall(
            f"SELECT {_COLUMNS} FROM memories WHERE rid = ANY(%s)",
            ([int(r) for r in rowids],), dicts=True,
        )
        return {int(row["rid"]): _row_to_memory(row) for row in rows}

    def query(self, flt: MemoryFilter) -> list[Memory]:
        self.deferred.flush("memories", flt.user_id)
        where, params = where_clause(flt)
        sql = f"SELECT {_COLUMNS} FROM memories WHERE {where} ORDER BY created_at DESC, rid DESC"
        if flt.limit is not None:
            sql += " LIMIT %s"
            params.append(flt.limit)
        if flt.offset:
            sql += " OFFSET %s"
            params.append(flt.offset)
        return [_row_to_memory(r) for r in self.db.fetchall(sql, params, dicts=True)]

    def count(self, flt: MemoryFilter, *, cap: int | None = None) -> int:
        if flt.user_id is not None:
            self.db.lock_user(flt.user_id)  # per-user limits count inside the write path
        self.deferred.flush("memories", flt.user_id)
        where, params = where_clause(flt)
        if cap is not None:
            return int(self.db.scalar(
                f"SELECT count(*) FROM (SELECT 1 FROM memories WHERE {where} LIMIT %s) AS c",
                [*params, max(cap, 0)],
            ))
        return int(self.db.scalar(f"SELECT count(*) FROM memories WHERE {where}", params))

    def recent_contents(self, user_id: str, limit: int) -> list[str]:
        self.deferred.flush("memories", user_id)
        rows = self.db.fetchall(
            "SELECT content FROM memories WHERE user_id = %s AND valid_until IS NULL"
            " ORDER BY created_at DESC LIMIT %s",
            (user_id, limit),
        )
        return [r[0] for r in rows]

    def find_current_by_content(self, user_id: str, content: str) -> Memory | None:
        self.db.lock_user(user_id)  # the write path's first read: what it finds stays true
        self.deferred.flush("memories", user_id)
        row = self.db.fetchone(
            f"SELECT {_COLUMNS} FROM memories WHERE user_id = %s AND content_norm = %s"
            " AND valid_until IS NULL ORDER BY rid LIMIT 1",
            (user_id, normalize_content(content)), dicts=True,
        )
        return None if row is None else _row_to_memory(row)

    def find_current_by_contents(
        self, wanted: Sequence[tuple[str, str]]
    ) -> list[Memory | None]:
        """`find_current_by_content` for each (user_id, content), in one statement after one
        lock statement; announces the batch's size to the row-key reservation."""
        if not wanted:
            return []
        self.db.lock_users([u for u, _ in wanted])
        self.deferred.flush()  # the statement reads every user of the batch
        self.deferred.expect_rows(len(wanted))
        rows = self.db.fetchall(
            "SELECT q.n, m.* FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY"
            " AS q(user_id, norm, n) CROSS JOIN LATERAL ("
            f"SELECT {_COLUMNS} FROM memories WHERE user_id = q.user_id"
            " AND content_norm = q.norm AND valid_until IS NULL ORDER BY rid LIMIT 1) m",
            ([u for u, _ in wanted], [normalize_content(c) for _, c in wanted]), dicts=True,
        )
        found: list[Memory | None] = [None] * len(wanted)
        for row in rows:
            found[int(row.pop("n")) - 1] = _row_to_memory(row)
        return found

    def chain(self, memory_id: str) -> list[Memory]:
        return shared.chain(self.get, memory_id)

    def embeddings_as_of(self, flt: MemoryFilter) -> list[tuple[int, np.ndarray]]:
        self.deferred.flush("memories", flt.user_id)
        where, params = where_clause(flt)
        rows = self.db.fetchall(
            f"SELECT rid, embedding FROM memories WHERE {where} AND embedding IS NOT NULL", params,
            binary=True,
        )
        return [(int(r[0]), _vector(r[1])) for r in rows]  # type: ignore[misc]

    def iter_all(self, user_id: str | None = None) -> Iterator[Memory]:
        """Every row in insertion order, a page per round trip (keyset paging: no server-side
        cursor, so no transaction is held open while the caller works)."""
        self.deferred.flush("memories")
        last = 0
        cond, params = ("AND user_id = %s", [user_id]) if user_id is not None else ("", [])
        while True:
            rows = self.db.fetchall(
                f"SELECT {_COLUMNS}, embedding FROM memories WHERE rid > %s {cond}"
                " ORDER BY rid LIMIT %s",
                [last, *params, _PAGE], dicts=True,
            )
            for row in rows:
                memory = _row_to_memory(row)
                vector = _vector(row["embedding"])
                if vector is not None:
                    memory.embedding = vector.tolist()
                yield memory
            if len(rows) < _PAGE:
                return
            last = int(rows[-1]["rid"])

    # --- audit trail ------------------------------------------------------------------------

    def record_event(
        self, memory_id: str, user_id: str, op: str, *, old: Any = None, new: Any = None,
        request_id: str | None = None, at: datetime | None = None,
    ) -> None:
        self.deferred.defer_row(
            _INSERT_EVENTS, user_id,
            (
                memory_id, user_id, op, _utc(at) or datetime.now(UTC), request_id,
                shared.event_json(old), shared.event_json(new),
            ),
        )

    def events(self, memory_id: str) -> list[dict[str, Any]]:
        self.deferred.flush("memory_events")
        rows = self.db.fetchall(
            "SELECT op, at, request_id, old, new FROM memory_events WHERE memory_id = %s"
            " ORDER BY id",
            (memory_id,), dicts=True,
        )
        return [shared.row_to_event(r, _utc) for r in rows]

    # --- purge and stats --------------------------------------------------------------------

    def purge(self, flt: MemoryFilter) -> tuple[list[int], dict[str, int]]:
        flt = shared.purge_filter(flt)
        where, params = where_clause(flt)
        db = self.db
        self.deferred.flush()  # the purge deletes index rows and events: send those first
        with db.transaction():
            db.lock_user(flt.user_id)  # type: ignore[arg-type]
            rows = db.fetchall(f"DELETE FROM memories WHERE {where} RETURNING rid, id", params)
            rids = [int(r[0]) for r in rows]
            ids = [r[1] for r in rows]
            whole_user = flt.session_id is None and flt.agent_id is None and flt.turn_id is None
            if whole_user:
                events = db.execute("DELETE FROM memory_events WHERE user_id = %s", (flt.user_id,))
            else:
                events = db.execute(
                    "DELETE FROM memory_events WHERE user_id = %s AND memory_id = ANY(%s)",
                    (flt.user_id, ids),
                ) if ids else 0
            outbox = 0
            for table in ("outbox", "outbox_dead"):  # parked rows hold the user's words too
                doomed = [
                    oid
                    for oid, payload in db.fetchall(
                        f"SELECT id, payload FROM {table} WHERE user_id = %s", (flt.user_id,)
                    )
                    if shared.in_scope(json.loads(payload).get("scope", {}), flt)
                ]
                if doomed:
                    outbox += db.execute(f"DELETE FROM {table} WHERE id = ANY(%s)", (doomed,))
        return rids, {"memories": len(rids), "events": events, "outbox": outbox}

    def checkpoint(self) -> None:
        """VACUUM the tables a purge touched, so the deleted rows' space is reclaimed in the table
        files instead of waiting for autovacuum. PostgreSQL keeps older copies in its WAL until
        it is recycled (and in any base backup): see the deployment notes."""
        with self.db.connection() as conn:
            for table in _VACUUMED:
                exists = conn.execute(
                    "SELECT to_regclass(quote_ident(current_schema()) || '.' || %s)", (table,)
                ).fetchone()
                if exists is not None and exists[0] is not None:
                    conn.execute(f"VACUUM {table}")

    def stats(self, user_id: str | None = None) -> dict[str, Any]:
        self.deferred.flush("memories", user_id)
        db = self.db
        cond, params = ("WHERE user_id = %s", [user_id]) if user_id is not None else ("", [])
        current = f"{cond} {'AND' if cond else 'WHERE'} valid_until IS NULL"
        row = db.fetchone(
            "SELECT count(*),"
            " count(*) FILTER (WHERE valid_until IS NULL),"
            " count(*) FILTER (WHERE valid_until IS NOT NULL AND forgotten_at IS NULL),"
            " count(*) FILTER (WHERE forgotten_at IS NOT NULL)"
            f" FROM memories {cond}",
            params,
        )
        counts = [int(v or 0) for v in row]

        def grouped(expr: str) -> dict[str, int]:
            return {
                str(k): int(v)
                for k, v in db.fetchall(
                    f"SELECT {expr}, count(*) FROM memories {current} GROUP BY 1 ORDER BY 2 DESC",
                    params,
                )
            }

        summary = shared.stats_summary(
            counts, grouped, user_id, self.outbox.size(), self.outbox.dead_count()
        )
        summary["db_bytes"] = int(db.scalar("SELECT pg_database_size(current_database())"))
        return summary

    def candidates(self, rowids: Sequence[int]) -> shared.CandidateRows:
        # One statement; whole memories built only for what recall returns.
        return read_candidates(self, rowids)
