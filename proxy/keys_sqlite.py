"""Proxy keys in a small SQLite file of their own (`memory.db` → `memory.keys.db`): the key store
of a single machine. Hashes only, in a file only its owner can read."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from ..memory.db import storage_error
from .keys import (
    KeyCheck,
    KeyStoreBase,
    KeyStoreError,
    ProxyKey,
    StoredKey,
    check_presented,
    record_from_row,
)

__all__ = ["SqliteKeyStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS proxy_keys (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    tenant TEXT NOT NULL,
    user_id TEXT,
    user_prefix TEXT,
    admin INTEGER NOT NULL DEFAULT 0,
    name TEXT,
    requests_per_minute INTEGER,
    memories_per_minute INTEGER,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    revoked_at TEXT
);
"""


class SqliteKeyStore(KeyStoreBase):
    """Thread-safe; one connection, serialised by a lock (lookups are one primary-key read).
    Other processes (the `headroom keys` CLI) may write the same file at any time: every read
    goes to the file, so a revocation counts from the next request."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @property
    def location(self) -> str:
        return str(self.path)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                # Hashes only, but still nobody else's business.
                fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0,
                                   isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _insert(self, key: StoredKey) -> None:
        with self._lock:
            self._connection().execute(_INSERT, _values(key))

    def export(self) -> list[StoredKey]:
        if self._conn is None and not self.path.exists():
            raise KeyStoreError(f"no key file at {self.path}")
        with self._lock:
            rows = self._connection().execute(
                "SELECT * FROM proxy_keys ORDER BY created_at, id").fetchall()
        return [StoredKey(record_from_row(row), row["secret_sha256"]) for row in rows]

    def restore(self, keys: Iterable[StoredKey]) -> int:
        added = 0
        with self._lock:
            conn = self._connection()
            with conn:  # one transaction: all of them or none
                conn.execute("BEGIN IMMEDIATE")
                for key in keys:
                    added += conn.execute(_INSERT.replace("INSERT", "INSERT OR IGNORE", 1),
                                          _values(key)).rowcount
        return added

    def list(self, tenant: str | None = None) -> list[ProxyKey]:
        sql = "SELECT * FROM proxy_keys"
        params: tuple[str, ...] = ()
        if tenant is not None:
            sql += " WHERE tenant = ?"
            params = (tenant,)
        with self._lock:
            rows = self._connection().execute(sql + " ORDER BY created_at, id", params).fetchall()
        return [record_from_row(row) for row in rows]

    def revoke(self, key_id: str) -> ProxyKey:
        with self._lock:
            self._connection().execute(
                "UPDATE proxy_keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?",
                (_now_text(), key_id),
            )
        return self.get(key_id)

    def verify(self, presented: str) -> KeyCheck:
        # No file yet means no keys: a keyless server does not create one for a stray `hk_`.
        if self._conn is None and not self.path.exists():
            return check_presented(presented, lambda key_id: None)
        return check_presented(presented, self._row)

    def _row(self, key_id: str) -> sqlite3.Row | None:
        with self._lock:
            try:
                row: sqlite3.Row | None = self._connection().execute(
                    "SELECT * FROM proxy_keys WHERE id = ?", (key_id,)
                ).fetchone()
            except sqlite3.Error as exc:
                # A file that cannot be read is a 503 at the gate (as a PostgreSQL store that is
                # down), not a 500: the key may be fine, the store is not.
                translated = storage_error(exc, str(self.path))
                if translated is None:
                    raise
                raise translated from exc
        return row


_INSERT = (
    "INSERT INTO proxy_keys (id, secret_sha256, tenant, user_id, user_prefix, admin, name,"
    " requests_per_minute, memories_per_minute, created_at, expires_at, revoked_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _values(key: StoredKey) -> tuple[object, ...]:
    r = key.record
    return (r.id, key.digest, r.tenant, r.user, r.user_prefix, int(r.admin), r.name,
            r.requests_per_minute, r.memories_per_minute, r.created_at.isoformat(),
            r.expires_at.isoformat() if r.expires_at else None,
            r.revoked_at.isoformat() if r.revoked_at else None)


def _now_text() -> str:
    return datetime.now(UTC).isoformat()
