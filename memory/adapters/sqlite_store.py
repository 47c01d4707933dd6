"""The SQLite `MemoryStore`: rows, the audit trail, purge with counts, and stats; its `outbox`
is the `SQLiteOutbox` on the same file."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

import numpy as np

from ..candidates import CandidateRows
from ..db import Database, storage_error
from ..migrations import migrate
from ..models import Memory, MemoryFilter
from ..timefmt import from_db, to_db, to_db_opt
from . import store_shared as shared
from .sqlite_outbox import SQLiteOutbox
from .store_shared import COLUMNS as _COLUMNS
from .store_shared import Dialect, normalize_content

__all__ = ["SQLiteMemoryStore", "normalize_content"]


def _in_list(column: str, values: list[Any]) -> tuple[str, list[Any]]:
    return f"{column} IN ({','.join('?' * len(values))})", values


_SQLITE = Dialect(mark="?", one_of=_in_list, time=to_db)


# What recall weighs of a candidate (`CandidateRows`): times as epoch microseconds, read from
# the fixed-width text (`timefmt`) in SQL, so no row's times are parsed in Python.
_MICROS = "CAST(strftime('%s', {0}) AS INTEGER) * 1000000 + CAST(substr({0}, 21, 6) AS INTEGER)"
_CANDIDATE_COLUMNS = (
    "rid, user_id, session_id, scope_key, category, content, importance, "
    f"{_MICROS.format('created_at')}, {_MICROS.format('valid_from')}, "
    "valid_until IS NULL AND forgotten_at IS NULL, embedding"
)


def where_clause(flt: MemoryFilter) -> tuple[str, list[Any]]:
    """SQL conditions for a filter, in SQLite's spelling (see store_shared.where_clause)."""
    return shared.where_clause(flt, _SQLITE)


def _row_to_memory(row: Any) -> Memory:
    return shared.row_to_memory(row, from_db)


class SQLiteMemoryStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        migrate(db.conn)
        self.outbox = SQLiteOutbox(db)  # the Outbox port on the same file and connections

    def transaction(self) -> AbstractContextManager[None]:
        return self.db.transaction()

    # --- settings ---------------------------------------------------------------------------

    def get_setting(self, key: str) -> str | None:
        row = self.db.conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_setting(self, key: str, value: str) -> None:
        self.db.conn.execute(
            "INSERT INTO settings(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # --- rows -------------------------------------------------------------------------------

    def insert(self, memory: Memory) -> int:
        embedding = (
            None
            if memory.embedding is None
            else np.asarray(memory.embedding, dtype=np.float32).tobytes()
        )
        cur = self.db.conn.execute(
            "INSERT INTO memories (id, user_id, session_id, agent_id, turn_id, scope_key, content,"
            " content_norm, category, importance, entity_refs, metadata, created_at, valid_from,"
            " valid_until, supersedes, superseded_by, forgotten_at, access_count, last_accessed,"
            " embedding, embedding_model)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                memory.id, memory.user_id, memory.session_id, memory.agent_id, memory.turn_id,
                memory.scope.key, memory.content, normalize_content(memory.content),
                memory.category.value, memory.importance, json.dumps(memory.entity_refs),
                json.dumps(memory.metadata), to_db(memory.created_at), to_db(memory.valid_from),
                to_db_opt(memory.valid_until), memory.supersedes, memory.superseded_by,
                to_db_opt(memory.forgotten_at), memory.access_count,
                to_db_opt(memory.last_accessed), embedding, memory.embedding_model,
            ),
        )
        return int(cur.lastrowid)

    def save(self, memory: Memory) -> None:
        self.db.conn.execute(
            "UPDATE memories SET session_id = ?, agent_id = ?, turn_id = ?, scope_key = ?,"
            " category = ?, importance = ?, entity_refs = ?, metadata = ?, valid_until = ?,"
            " superseded_by = ?, forgotten_at = ?, access_count = ?, last_accessed = ?"
            " WHERE id = ?",
            (
                memory.session_id, memory.agent_id, memory.turn_id, memory.scope.key,
                memory.category.value, memory.importance, json.dumps(memory.entity_refs),
                json.dumps(memory.metadata), to_db_opt(memory.valid_until),
                memory.superseded_by, to_db_opt(memory.forgotten_at), memory.access_count,
                to_db_opt(memory.last_accessed), memory.id,
            ),
        )

    def touch(self, memory_ids: Sequence[str], when: datetime) -> None:
        self.db.conn.executemany(
            "UPDATE memories SET access_count = access_count + 1, last_accessed = ? WHERE id = ?",
            [(to_db(when), mid) for mid in memory_ids],
        )

    def get(self, memory_id: str) -> Memory | None:
        row = self.db.conn.execute(
            f"SELECT {_COLUMNS} FROM memories WHERE id = ?", (memory_id,)
        ).fetchone()
        return None if row is None else _row_to_memory(row)

    def get_embedding(self, memory_id: str) -> np.ndarray | None:
        row = self.db.conn.execute(
            "SELECT embedding FROM memories WHERE id = ?", (memory_id,)
        ).fetchone()
        if row is None or row[0] is None:
            return None
        return np.frombuffer(row[0], dtype=np.float32)

    def _rows_by_rowids(
        self, columns: str, rowids: Sequence[int], where: str = "", *, plain: bool = False
    ) -> list[Any]:
        """`SELECT columns` of these rows, in chunks that stay under SQLite's variable limit;
        `plain`: as tuples (`_plain_rows`)."""
        ids = [int(r) for r in rowids]
        out: list[Any] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            sql = (
                f"SELECT {columns} FROM memories"
                f" WHERE rid IN ({','.join('?' * len(chunk))}){where}"
            )
            out += self._plain_rows(sql, chunk) if plain else (
                self.db.conn.execute(sql, chunk).fetchall()
            )
        return out

    def _plain_rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """`sql`'s rows as plain tuples: a `Row` object per row is ~20% of a wide read."""
        conn = self.db.conn
        cursor = conn.cursor()
        cursor.row_factory = None
        try:
            return cursor.execute(sql, params).fetchall()  # type: ignore[no-any-return]
        except Exception as exc:
            raise (storage_error(exc, conn.path) or exc) from exc
        finally:
            cursor.close()

    def embeddings_by_rowids(self, rowids: Sequence[int]) -> dict[int, np.ndarray]:
        rows = self._rows_by_rowids("rid, embedding", rowids, " AND embedding IS NOT NULL")
        return {int(rid): np.frombuffer(blob, dtype=np.float32) for rid, blob in rows}

    def rowid_of(self, memory_id: str) -> int | None:
        row = self.db.conn.execute("SELECT rid FROM memories WHERE id = ?", (memory_id,)).fetchone()
        return None if row is None else int(row[0])

    def get_by_rowids(self, rowids: Sequence[int]) -> dict[int, Memory]:
        rows = self._rows_by_rowids(_COLUMNS, rowids)
        return {int(row["rid"]): _row_to_memory(row) for row in rows}

    def candidates(self, rowids: Sequence[int]) -> CandidateRows:
        rows = self._rows_by_rowids(_CANDIDATE_COLUMNS, rowids, plain=True)
        return CandidateRows.from_rows(rows, self.get_by_rowids)

    def query(self, flt: MemoryFilter) -> list[Memory]:
        where, params = where_clause(flt)
        order = " ORDER BY created_at DESC, rid DESC"
        if flt.limit is not None and flt.min_importance is not None:
            # The core tier's read: the rows are chosen and ordered inside the covering index
            # memories_user_core, and only the ones kept are read whole (m010).
            sql = (
                f"SELECT {_COLUMNS} FROM memories WHERE rid IN (SELECT rid FROM memories"
                f" WHERE {where}{order} LIMIT ? OFFSET ?){order}"
            )
            return [
                _row_to_memory(r)
                for r in self.db.conn.execute(sql, [*params, flt.limit, flt.offset]).fetchall()
            ]
        sql = f"SELECT {_COLUMNS} FROM memories WHERE {where}{order}"
        if flt.limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params += [flt.limit, flt.offset]
        elif flt.offset:
            sql += " LIMIT -1 OFFSET ?"
            params.append(flt.offset)
        return [_row_to_memory(r) for r in self.db.conn.execute(sql, params).fetchall()]

    def count(self, flt: MemoryFilter, *, cap: int | None = None) -> int:
        where, params = where_clause(flt)
        sql = f"SELECT count(*) FROM memories WHERE {where}"
        if cap is not None:  # a heavy user's wide window: stop at the cap, not at its end
            sql = f"SELECT count(*) FROM (SELECT 1 FROM memories WHERE {where} LIMIT ?)"
            params.append(max(cap, 0))
        return int(self.db.conn.execute(sql, params).fetchone()[0])

    def recent_contents(self, user_id: str, limit: int) -> list[str]:
        rows = self.db.conn.execute(
            "SELECT content FROM memories WHERE user_id = ? AND valid_until IS NULL"
            " ORDER BY created_at DESC LIMIT ?",
            (user_id, limit),
        ).fetchall()
        return [r[0] for r in rows]

    def find_current_by_content(self, user_id: str, content: str) -> Memory | None:
        row = self.db.conn.execute(
            f"SELECT {_COLUMNS} FROM memories WHERE user_id = ? AND content_norm = ?"
            " AND valid_until IS NULL ORDER BY rid LIMIT 1",
            (user_id, normalize_content(content)),
        ).fetchone()
        return None if row is None else _row_to_memory(row)

    def chain(self, memory_id: str) -> list[Memory]:
        return shared.chain(self.get, memory_id)

    def embeddings_as_of(self, flt: MemoryFilter) -> list[tuple[int, np.ndarray]]:
        where, params = where_clause(flt)
        rows = self.db.conn.execute(
            f"SELECT rid, embedding FROM memories WHERE {where} AND embedding IS NOT NULL", params
        ).fetchall()
        return [(int(r[0]), np.frombuffer(r[1], dtype=np.float32)) for r in rows]

    def iter_all(self, user_id: str | None = None) -> Iterator[Memory]:
        sql = f"SELECT {_COLUMNS}, embedding FROM memories"
        params: list[Any] = []
        if user_id is not None:
            sql += " WHERE user_id = ?"
            params.append(user_id)
        sql += " ORDER BY rid"
        for row in self.db.conn.execute(sql, params):
            memory = _row_to_memory(row)
            if row["embedding"] is not None:
                memory.embedding = np.frombuffer(row["embedding"], dtype=np.float32).tolist()
            yield memory

    # --- audit trail ------------------------------------------------------------------------

    def record_event(
        self, memory_id: str, user_id: str, op: str, *, old: Any = None, new: Any = None,
        request_id: str | None = None, at: datetime | None = None,
    ) -> None:
        self.db.conn.execute(
            "INSERT INTO memory_events(memory_id, user_id, op, at, request_id, old, new)"
            " VALUES (?,?,?,?,?,?,?)",
            (
                memory_id, user_id, op, to_db(at), request_id,
                shared.event_json(old), shared.event_json(new),
            ),
        )

    def events(self, memory_id: str) -> list[dict[str, Any]]:
        rows = self.db.conn.execute(
            "SELECT op, at, request_id, old, new FROM memory_events WHERE memory_id = ?"
            " ORDER BY id",
            (memory_id,),
        ).fetchall()
        return [shared.row_to_event(r, from_db) for r in rows]

    # --- purge and stats --------------------------------------------------------------------

    def purge(self, flt: MemoryFilter) -> tuple[list[int], dict[str, int]]:
        flt = shared.purge_filter(flt)
        where, params = where_clause(flt)
        conn = self.db.conn
        rows = conn.execute(f"SELECT rid, id FROM memories WHERE {where}", params).fetchall()
        rids = [int(r[0]) for r in rows]
        ids = [r[1] for r in rows]
        whole_user = flt.session_id is None and flt.agent_id is None and flt.turn_id is None
        events = 0
        if whole_user:
            events = conn.execute(
                "DELETE FROM memory_events WHERE user_id = ?", (flt.user_id,)
            ).rowcount
        else:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                events += conn.execute(
                    f"DELETE FROM memory_events WHERE memory_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).rowcount
        outbox = 0
        for table in ("outbox", "outbox_dead"):  # parked rows hold the user's words too
            for oid, payload in conn.execute(
                f"SELECT id, payload FROM {table} WHERE user_id = ?", (flt.user_id,)
            ).fetchall():
                if shared.in_scope(json.loads(payload).get("scope", {}), flt):
                    conn.execute(f"DELETE FROM {table} WHERE id = ?", (oid,))
                    outbox += 1
        deleted = conn.execute(f"DELETE FROM memories WHERE {where}", params).rowcount
        return rids, {"memories": deleted, "events": events, "outbox": outbox}

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the main file and truncate it, so pages a purge overwrote
        leave no older copy behind in the WAL (best effort: a long reader can keep it busy)."""
        self.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def stats(self, user_id: str | None = None) -> dict[str, Any]:
        conn = self.db.conn
        cond, params = ("WHERE user_id = ?", [user_id]) if user_id is not None else ("", [])
        and_ = "AND" if cond else "WHERE"
        current = f"{cond} {and_} valid_until IS NULL"
        row = conn.execute(
            "SELECT count(*),"
            " sum(valid_until IS NULL),"
            " sum(valid_until IS NOT NULL AND forgotten_at IS NULL),"
            " sum(forgotten_at IS NOT NULL)"
            f" FROM memories {cond}",
            params,
        ).fetchone()
        counts = [int(v or 0) for v in row]

        def grouped(expr: str) -> dict[str, int]:
            return {
                str(k): int(v)
                for k, v in conn.execute(
                    f"SELECT {expr}, count(*) FROM memories {current} GROUP BY 1 ORDER BY 2 DESC",
                    params,
                ).fetchall()
            }

        return shared.stats_summary(
            counts, grouped, user_id, self.outbox.size(), self.outbox.dead_count()
        )
