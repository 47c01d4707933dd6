"""Proxy keys in PostgreSQL: one `headroom_keys` table that every replica reads, so a key created
or revoked through any of them (or `headroom keys`) counts on all of them from the next request.

Every check is one primary-key read on a small pool of its own (no cache, hence no staleness to
bound). The table lives in the schema the URL's search_path names, beside the memories' tables
when the URL is the memory database's, and is created by named migrations under an advisory lock
(as memory/adapters/postgres/schema.py does) so replicas starting at once create it once. Secrets
are kept exactly as in the SQLite store: the SHA-256 of the whole key, never the key.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, NoReturn

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from ..memory.adapters.postgres.connection import redact_url, storage_error
from ..memory.errors import StorageError
from .keys import (
    KeyCheck,
    KeyStoreBase,
    ProxyKey,
    StoredKey,
    check_presented,
    record_from_row,
)

log = logging.getLogger(__name__)

__all__ = ["KEY_MIGRATIONS", "PgKeyStore", "migrate_keys"]

KEY_MIGRATIONS: list[tuple[str, list[str]]] = [
    ("k001_keys", [
        """CREATE TABLE headroom_keys (
            id text PRIMARY KEY,
            secret_sha256 text NOT NULL,
            tenant text NOT NULL,
            user_id text,
            user_prefix text,
            admin boolean NOT NULL DEFAULT false,
            name text,
            requests_per_minute integer,
            memories_per_minute integer,
            created_at timestamptz NOT NULL,
            expires_at timestamptz,
            revoked_at timestamptz
        )""",
        "CREATE INDEX headroom_keys_tenant ON headroom_keys(tenant, created_at)",
    ]),
]
_VERSION_TABLE = "headroom_keys_schema"
_RETRY_S = 1.0


def _applied(conn: psycopg.Connection[Any]) -> set[str]:
    exists = conn.execute(
        "SELECT to_regclass(quote_ident(current_schema()) || %s)", (f".{_VERSION_TABLE}",)
    ).fetchone()
    if exists is None or exists[0] is None:
        return set()
    return {row[0] for row in conn.execute(f"SELECT name FROM {_VERSION_TABLE}").fetchall()}


def migrate_keys(conn: psycopg.Connection[Any]) -> list[str]:
    """Apply the key table's pending migrations (autocommit connection); returns their names."""
    if {name for name, _ in KEY_MIGRATIONS} <= _applied(conn):
        return []  # nothing pending: no lock, so opening never waits on another replica
    applied: list[str] = []
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('headroom:' || current_schema() || ':keys'))"
        )
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {_VERSION_TABLE}"
            " (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = _applied(conn)  # what another replica applied while this one waited
        for name, statements in KEY_MIGRATIONS:
            if name in done:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"INSERT INTO {_VERSION_TABLE}(name) VALUES (%s)", (name,))
            applied.append(name)
            log.info("applied key-store migration %s", name)
    return applied


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET TIME ZONE 'UTC'")


class PgKeyStore(KeyStoreBase):
    """Thread-safe. Connects on first use (and again after a failed attempt), so a proxy whose
    database is down at startup authenticates as soon as it is back; until then every check
    raises `StorageError` (the gate answers 503, never lets the request through)."""

    def __init__(self, url: str, *, pool_size: int = 4, timeout_s: float = 5.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._pool_size = pool_size
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._lock = threading.Lock()
        self._closed = False
        # The last failed attempt to connect: checks within _RETRY_S of it fail at once rather
        # than queue behind one another's connect timeouts.
        self._failed: tuple[float, StorageError] | None = None

    @property
    def location(self) -> str:
        return redact_url(self.url)

    # --- connections ------------------------------------------------------------------------

    def _open(self) -> ConnectionPool[psycopg.Connection[Any]]:
        with self._lock:
            if self._closed:
                raise StorageError(f"key store {self.location} is closed", path=self.location)
            if self._pool is not None:
                return self._pool
            if self._failed is not None and time.monotonic() - self._failed[0] < _RETRY_S:
                raise self._failed[1]
            try:
                with psycopg.connect(self.url, autocommit=True,
                                     connect_timeout=max(1, int(self.timeout_s))) as conn:
                    migrate_keys(conn)
                pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
                    self.url, min_size=1, max_size=self._pool_size, timeout=self.timeout_s,
                    kwargs={"autocommit": True, "row_factory": dict_row},
                    configure=_configure, check=ConnectionPool.check_connection,
                    open=False, name="headroom-keys",
                )
                pool.open(wait=True, timeout=self.timeout_s)
            except Exception as exc:
                failed = _storage_error(exc, self.location)
                if failed is None:
                    raise
                self._failed = (time.monotonic(), failed)
                raise failed from exc
            self._failed = None
            self._pool = pool
            return pool

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        pool = self._open()
        try:
            with pool.connection() as conn:
                yield conn
        except Exception as exc:
            _reraise(exc, self.location)

    def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._connection() as conn:
            rows: list[dict[str, Any]] = conn.execute(sql, params).fetchall()
            return rows

    def _row(self, key_id: str) -> dict[str, Any] | None:
        rows = self._fetchall("SELECT * FROM headroom_keys WHERE id = %s", (key_id,))
        return rows[0] if rows else None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    # --- KeyStore ---------------------------------------------------------------------------

    def _insert(self, key: StoredKey) -> None:
        with self._connection() as conn:
            conn.execute(_INSERT, _values(key))

    def export(self) -> list[StoredKey]:
        rows = self._fetchall("SELECT * FROM headroom_keys ORDER BY created_at, id")
        return [StoredKey(record_from_row(row), row["secret_sha256"]) for row in rows]

    def restore(self, keys: Iterable[StoredKey]) -> int:
        added = 0
        with self._connection() as conn, conn.transaction():  # all of them or none
            for key in keys:
                added += conn.execute(_INSERT + " ON CONFLICT (id) DO NOTHING",
                                      _values(key)).rowcount
        return added

    def list(self, tenant: str | None = None) -> list[ProxyKey]:
        where, params = ("WHERE tenant = %s", (tenant,)) if tenant is not None else ("", ())
        rows = self._fetchall(f"SELECT * FROM headroom_keys {where} ORDER BY created_at, id",
                              params)
        return [record_from_row(row) for row in rows]

    def revoke(self, key_id: str) -> ProxyKey:
        with self._connection() as conn:
            conn.execute(
                "UPDATE headroom_keys SET revoked_at = coalesce(revoked_at, %s) WHERE id = %s",
                (datetime.now(UTC), key_id),
            )
        return self.get(key_id)

    def verify(self, presented: str) -> KeyCheck:
        return check_presented(presented, self._row)


_INSERT = (
    "INSERT INTO headroom_keys (id, secret_sha256, tenant, user_id, user_prefix, admin, name,"
    " requests_per_minute, memories_per_minute, created_at, expires_at, revoked_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


def _values(key: StoredKey) -> tuple[object, ...]:
    r = key.record
    return (r.id, key.digest, r.tenant, r.user, r.user_prefix, r.admin, r.name,
            r.requests_per_minute, r.memories_per_minute, r.created_at, r.expires_at,
            r.revoked_at)


def _storage_error(exc: Exception, where: str) -> StorageError | None:
    """A server failure as the one-line `StorageError` the CLI prints and the gate turns into a
    503; None for anything else (a bug, a `KeyStoreError`)."""
    if isinstance(exc, StorageError):
        return exc
    if not isinstance(exc, psycopg.Error | PoolTimeout):
        return None
    known = storage_error(exc, where)
    if known is None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        known = StorageError(f"key store {where}: {first}", reason="unavailable", path=where)
    return known


def _reraise(exc: Exception, where: str) -> NoReturn:
    translated = _storage_error(exc, where)
    if translated is None or translated is exc:
        raise exc
    raise translated from exc
