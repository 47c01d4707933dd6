"""The proxy key store: keys that bind a client to a tenant (and optionally one user or a user
prefix), kept in a small SQLite file of their own next to the memory database.

A key is `hk_<id>_<secret>`. It is shown once, at creation; the store keeps only its id (public:
lists, logs and memory events name keys by it) and the SHA-256 of the whole key. The secret has
256 random bits, so a plain hash is enough (no password stretching needed), and the check is a
constant-time comparison. The file is separate from the memory database so that key management
needs no schema change there and works the same whatever store the memories live in.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ..memory.models import default_db_path, is_database_url
from .errors import BadRequestError
from .scope import check_id, check_tenant

__all__ = [
    "KEY_PREFIX",
    "KeyCheck",
    "KeyStore",
    "KeyStoreError",
    "ProxyKey",
    "default_key_db_path",
    "parse_duration",
]

KEY_PREFIX = "hk_"
_ID_RE = re.compile(r"[0-9a-f]{12}")
_DURATION_RE = re.compile(r"(\d+)\s*([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# Compared against when the id is unknown, so that a miss costs the same as a wrong secret.
_DUMMY_HASH = hashlib.sha256(b"headroom-no-such-key").hexdigest()

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


class KeyStoreError(Exception):
    """A key that cannot be created or found (bad tenant, unknown id)."""


def default_key_db_path(db_path: str | Path) -> Path:
    """`memory.db` keeps its keys in `memory.keys.db`, in the same directory. A postgresql://
    database has no directory: its keys default to the user data directory's."""
    if is_database_url(db_path):
        db_path = default_db_path()
    path = Path(db_path)
    return path.with_name(f"{path.stem}.keys.db")


def parse_duration(text: str) -> timedelta:
    """`90m`, `12h`, `30d`, `2w` (or combinations such as `1d12h`)."""
    cleaned = text.strip().lower()
    parts = _DURATION_RE.findall(cleaned)
    if not parts or _DURATION_RE.sub("", cleaned).strip():
        raise KeyStoreError(f"not a duration: {text!r} (use e.g. 90m, 12h, 30d, 2w)")
    total = timedelta()
    for amount, unit in parts:
        total += timedelta(**{_UNITS[unit]: int(amount)})
    if total <= timedelta():
        raise KeyStoreError(f"duration must be positive: {text!r}")
    return total


def _now() -> datetime:
    return datetime.now(UTC)


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ProxyKey:
    """One key's record (never its secret)."""

    id: str
    tenant: str
    user: str | None
    user_prefix: str | None
    admin: bool
    name: str | None
    requests_per_minute: int | None
    memories_per_minute: int | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def status(self, now: datetime | None = None) -> str:
        """`active`, `revoked` or `expired`."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or _now()):
            return "expired"
        return "active"

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id, "tenant": self.tenant, "user": self.user,
            "user_prefix": self.user_prefix, "admin": self.admin, "name": self.name,
            "requests_per_minute": self.requests_per_minute,
            "memories_per_minute": self.memories_per_minute,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "status": self.status(),
        }


@dataclass(frozen=True)
class KeyCheck:
    """The outcome of presenting a key: the record when it is usable, else why not."""

    key: ProxyKey | None
    reason: str | None = None  # "unknown", "revoked", "expired"

    @property
    def ok(self) -> bool:
        return self.key is not None and self.reason is None


class KeyStore:
    """Thread-safe; one connection, serialised by a lock (lookups are one primary-key read).
    Other processes (the `headroom keys` CLI) may write the same file at any time: every read
    goes to the file, so a revocation counts from the next request."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

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

    def create(
        self, tenant: str, *, user: str | None = None, user_prefix: str | None = None,
        admin: bool = False, expires_in: timedelta | None = None, name: str | None = None,
        requests_per_minute: int | None = None, memories_per_minute: int | None = None,
    ) -> tuple[ProxyKey, str]:
        """A new key and its secret (the only time the secret exists outside the client)."""
        if user is not None and user_prefix is not None:
            raise KeyStoreError("a key binds either one user or a user prefix, not both")
        try:
            tenant = check_tenant(tenant)
            user = check_id("user", user) if user is not None else None
            user_prefix = check_id("user prefix", user_prefix) if user_prefix is not None else None
        except BadRequestError as exc:
            raise KeyStoreError(exc.message) from None
        for label, limit in (("requests", requests_per_minute),
                             ("memories", memories_per_minute)):
            if limit is not None and limit < 0:
                raise KeyStoreError(f"{label} per minute must be 0 or more")
        key_id = secrets.token_hex(6)
        secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        now = _now()
        record = ProxyKey(
            id=key_id, tenant=tenant, user=user, user_prefix=user_prefix, admin=admin,
            name=name, requests_per_minute=requests_per_minute,
            memories_per_minute=memories_per_minute, created_at=now,
            expires_at=now + expires_in if expires_in is not None else None, revoked_at=None,
        )
        with self._lock:
            self._connection().execute(
                "INSERT INTO proxy_keys (id, secret_sha256, tenant, user_id, user_prefix, admin,"
                " name, requests_per_minute, memories_per_minute, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, _digest(secret), tenant, user, user_prefix, int(admin), name,
                 requests_per_minute, memories_per_minute, now.isoformat(),
                 record.expires_at.isoformat() if record.expires_at else None),
            )
        return record, secret

    def list(self, tenant: str | None = None) -> list[ProxyKey]:
        sql = "SELECT * FROM proxy_keys"
        params: tuple[str, ...] = ()
        if tenant is not None:
            sql += " WHERE tenant = ?"
            params = (tenant,)
        with self._lock:
            rows = self._connection().execute(sql + " ORDER BY created_at, id", params).fetchall()
        return [_record(row) for row in rows]

    def get(self, key_id: str) -> ProxyKey:
        with self._lock:
            row = self._connection().execute(
                "SELECT * FROM proxy_keys WHERE id = ?", (key_id,)
            ).fetchone()
        if row is None:
            raise KeyStoreError(f"no key with id {key_id!r}")
        return _record(row)

    def revoke(self, key_id: str) -> ProxyKey:
        """Idempotent: revoking a revoked key keeps its first revocation time."""
        with self._lock:
            self._connection().execute(
                "UPDATE proxy_keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?",
                (_now().isoformat(), key_id),
            )
        return self.get(key_id)

    def verify(self, presented: str) -> KeyCheck:
        """Check a presented key. Never raises on bad input; never logs it."""
        key_id = _key_id(presented)
        row = None
        # No file yet means no keys: a keyless server does not create one for a stray `hk_`.
        if key_id is not None and (self._conn is not None or self.path.exists()):
            with self._lock:
                row = self._connection().execute(
                    "SELECT * FROM proxy_keys WHERE id = ?", (key_id,)
                ).fetchone()
        stored = row["secret_sha256"] if row is not None else _DUMMY_HASH
        if not hmac.compare_digest(stored, _digest(presented)) or row is None:
            return KeyCheck(None, "unknown")
        record = _record(row)
        status = record.status()
        return KeyCheck(record if status == "active" else None,
                        None if status == "active" else status)


def _key_id(presented: str) -> str | None:
    if not presented.startswith(KEY_PREFIX):
        return None
    key_id, sep, _ = presented[len(KEY_PREFIX):].partition("_")
    return key_id if sep and _ID_RE.fullmatch(key_id) else None


def _record(row: sqlite3.Row) -> ProxyKey:
    return ProxyKey(
        id=row["id"], tenant=row["tenant"], user=row["user_id"], user_prefix=row["user_prefix"],
        admin=bool(row["admin"]), name=row["name"],
        requests_per_minute=row["requests_per_minute"],
        memories_per_minute=row["memories_per_minute"],
        created_at=datetime.fromisoformat(row["created_at"]),
        expires_at=_time(row["expires_at"]), revoked_at=_time(row["revoked_at"]),
    )
