"""The PostgreSQL `Outbox`: leased claims with `FOR UPDATE SKIP LOCKED`, dead letters, re-drive.

Many replicas share one queue. A claim is one `UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP
LOCKED) RETURNING` statement: concurrent claimers skip the rows another claim is taking instead of
waiting on them, and a row is leased to one owner until `lease_until`. Lease times are the
caller's wall clock seconds (`time.time()`, injectable), compared across replicas like the SQLite
outbox's. `complete` deletes the row only if the caller still owns it and runs on the thread's
transaction connection: inside the store's `transaction()` the apply and the delete commit as one.
A replica killed mid-batch leaves its rows leased; they are offered again when the lease runs out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from ...ports import ClaimedRow, DeadLetter
from ..sqlite_outbox import payload_user_id
from .connection import PgDatabase

__all__ = ["PostgresOutbox"]


class PostgresOutbox:
    def __init__(self, db: PgDatabase, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self._clock = clock

    def put(self, payload: dict[str, Any]) -> int:
        oid = self.db.scalar(
            "INSERT INTO outbox(created_at, user_id, payload) VALUES (%s, %s, %s) RETURNING id",
            (datetime.now(UTC), payload_user_id(payload), json.dumps(payload)),
        )
        return int(oid)

    def claim(self, limit: int, owner: str, lease_s: float) -> list[ClaimedRow]:
        if limit <= 0:
            return []
        now = self._clock()
        with self.db.transaction():
            rows = self.db.fetchall(
                "UPDATE outbox SET owner = %s, lease_until = %s"
                " WHERE id IN (SELECT id FROM outbox"
                "  WHERE lease_until IS NULL OR lease_until <= %s ORDER BY id LIMIT %s"
                "  FOR UPDATE SKIP LOCKED)"
                " RETURNING id, payload, attempts",
                (owner, now + lease_s, now, limit),
            )
        return sorted((int(r[0]), json.loads(r[1]), int(r[2])) for r in rows)

    def complete(self, outbox_id: int, owner: str) -> bool:
        return self.db.execute(
            "DELETE FROM outbox WHERE id = %s AND owner = %s", (outbox_id, owner)
        ) == 1

    def fail(
        self, outbox_id: int, owner: str, error: str, *, retry_after_s: float = 0.0
    ) -> bool:
        retry_at = self._clock() + retry_after_s if retry_after_s > 0 else None
        return self.db.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = %s, owner = NULL,"
            " lease_until = %s WHERE id = %s AND owner = %s",
            (error, retry_at, outbox_id, owner),
        ) == 1

    def dead_letter(self, outbox_id: int, error: str) -> bool:
        with self.db.transaction():
            moved = self.db.fetchall(
                "WITH gone AS (DELETE FROM outbox WHERE id = %s"
                "  RETURNING id, created_at, user_id, payload, attempts)"
                " INSERT INTO outbox_dead(outbox_id, created_at, user_id, payload, attempts,"
                " error, dead_at) SELECT id, created_at, user_id, payload, attempts + 1, %s, %s"
                " FROM gone RETURNING id",
                (outbox_id, error, datetime.now(UTC)),
            )
        return len(moved) == 1

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self.db.fetchall(
            "SELECT id, outbox_id, user_id, payload, attempts, error, created_at, dead_at"
            " FROM outbox_dead ORDER BY id LIMIT %s",
            (limit,),
        )
        return [
            DeadLetter(
                id=int(r[0]), outbox_id=int(r[1]), user_id=r[2], payload=json.loads(r[3]),
                attempts=int(r[4]), error=r[5], created_at=r[6].astimezone(UTC),
                dead_at=r[7].astimezone(UTC),
            )
            for r in rows
        ]

    def redrive(self, ids: Sequence[int] | None = None) -> int:
        with self.db.transaction():
            if ids is None:
                chosen = [int(r[0]) for r in self.db.fetchall(
                    "SELECT id FROM outbox_dead ORDER BY id FOR UPDATE"
                )]
            else:
                chosen = sorted({int(i) for i in ids})
            moved = 0
            for dead_id in chosen:
                # New rows at the tail: ops queued since then were written after this one failed.
                moved += len(self.db.fetchall(
                    "WITH back AS (DELETE FROM outbox_dead WHERE id = %s"
                    "  RETURNING created_at, user_id, payload)"
                    " INSERT INTO outbox(created_at, user_id, payload)"
                    " SELECT created_at, user_id, payload FROM back RETURNING id",
                    (dead_id,),
                ))
        return moved

    def size(self) -> int:
        return int(self.db.scalar("SELECT count(*) FROM outbox"))

    def dead_count(self) -> int:
        return int(self.db.scalar("SELECT count(*) FROM outbox_dead"))
