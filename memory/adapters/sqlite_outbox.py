"""The SQLite `Outbox`: leased claims, attempts, dead letters and re-drive on the `outbox` table.

A claim is one `UPDATE … RETURNING` statement inside BEGIN IMMEDIATE, so two threads or two
processes on one file can never lease the same row while its lease is valid. Lease times are wall
clock seconds (`time.time()`): they are compared across processes. `complete` deletes the row only
if the caller still owns it, and runs on the caller's connection: called inside the store's
`transaction()` (same `Database`, same thread) the apply and the delete commit as one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..db import Database
from ..migrations import migrate
from ..ports import ClaimedRow, DeadLetter
from ..timefmt import from_db, to_db

__all__ = ["SQLiteOutbox", "payload_user_id"]


def payload_user_id(payload: dict[str, Any]) -> str:
    """The user a payload writes for (kept in its own column so purge finds the user's rows)."""
    scope = payload.get("scope")
    return str(scope.get("user_id", "")) if isinstance(scope, dict) else ""


class SQLiteOutbox:
    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self._clock = clock
        migrate(db.conn)  # a no-op read when the store has already migrated the file

    def put(self, payload: dict[str, Any]) -> int:
        cur = self.db.conn.execute(
            "INSERT INTO outbox(created_at, user_id, payload) VALUES (?, ?, ?)",
            (to_db(), payload_user_id(payload), json.dumps(payload)),
        )
        return int(cur.lastrowid)

    def claim(self, limit: int, owner: str, lease_s: float) -> list[ClaimedRow]:
        if limit <= 0:
            return []
        now = self._clock()
        with self.db.transaction():
            rows = self.db.conn.execute(
                "UPDATE outbox SET owner = ?, lease_until = ?"
                " WHERE id IN (SELECT id FROM outbox"
                "  WHERE lease_until IS NULL OR lease_until <= ? ORDER BY id LIMIT ?)"
                " RETURNING id, payload, attempts",
                (owner, now + lease_s, now, limit),
            ).fetchall()
        # RETURNING comes in no promised order; callers apply oldest first.
        return sorted((int(r[0]), json.loads(r[1]), int(r[2])) for r in rows)

    def complete(self, outbox_id: int, owner: str) -> bool:
        cur = self.db.conn.execute(
            "DELETE FROM outbox WHERE id = ? AND owner = ?", (outbox_id, owner)
        )
        return cur.rowcount == 1

    def fail(
        self, outbox_id: int, owner: str, error: str, *, retry_after_s: float = 0.0
    ) -> bool:
        # A released row keeps owner NULL; lease_until then only delays its next offer.
        retry_at = self._clock() + retry_after_s if retry_after_s > 0 else None
        cur = self.db.conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?, owner = NULL,"
            " lease_until = ? WHERE id = ? AND owner = ?",
            (error, retry_at, outbox_id, owner),
        )
        return cur.rowcount == 1

    def dead_letter(self, outbox_id: int, error: str) -> bool:
        conn = self.db.conn
        with self.db.transaction():
            moved = conn.execute(
                "INSERT INTO outbox_dead(outbox_id, created_at, user_id, payload, attempts, error,"
                " dead_at) SELECT id, created_at, user_id, payload, attempts + 1, ?, ?"
                " FROM outbox WHERE id = ?",
                (error, to_db(), outbox_id),
            ).rowcount
            conn.execute("DELETE FROM outbox WHERE id = ?", (outbox_id,))
        return moved == 1

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self.db.conn.execute(
            "SELECT id, outbox_id, user_id, payload, attempts, error, created_at, dead_at"
            " FROM outbox_dead ORDER BY id LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            DeadLetter(
                id=int(r[0]), outbox_id=int(r[1]), user_id=r[2], payload=json.loads(r[3]),
                attempts=int(r[4]), error=r[5],
                created_at=from_db(r[6]),  # type: ignore[arg-type]
                dead_at=from_db(r[7]),  # type: ignore[arg-type]
            )
            for r in rows
        ]

    def redrive(self, ids: Sequence[int] | None = None) -> int:
        conn = self.db.conn
        if ids is None:
            chosen = [int(r[0]) for r in conn.execute("SELECT id FROM outbox_dead ORDER BY id")]
        else:
            chosen = sorted({int(i) for i in ids})
        moved = 0
        with self.db.transaction():
            for dead_id in chosen:
                # New rows at the tail: ops queued since then were written after this one failed.
                moved += conn.execute(
                    "INSERT INTO outbox(created_at, user_id, payload)"
                    " SELECT created_at, user_id, payload FROM outbox_dead WHERE id = ?",
                    (dead_id,),
                ).rowcount
                conn.execute("DELETE FROM outbox_dead WHERE id = ?", (dead_id,))
        return moved

    def size(self) -> int:
        return int(self.db.conn.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def dead_count(self) -> int:
        return int(self.db.conn.execute("SELECT count(*) FROM outbox_dead").fetchone()[0])
