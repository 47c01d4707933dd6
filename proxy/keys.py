"""The proxy key store: keys that bind a client to a tenant (and optionally one user or a user
prefix). What a key is, and the port its stores implement; the stores themselves are
`keys_sqlite.SqliteKeyStore` (a small file next to a SQLite memory database) and
`keys_postgres.PgKeyStore` (a table in a PostgreSQL database, shared by every replica).

A key is `hk_<id>_<secret>`. It is shown once, at creation; a store keeps only its id (public:
lists, logs and memory events name keys by it) and the SHA-256 of the whole key. The secret has
256 random bits, so a plain hash is enough (no password stretching needed), and the check is a
constant-time comparison. Keys live apart from the memories' tables so that key management needs
no change to the memory schema and works the same whatever store the memories live in.

Every check reads the store: a key created or revoked by another process (`headroom keys`, another
replica) counts from the next request, with no cache to go stale.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from ..memory.models import is_database_url
from .errors import BadRequestError
from .scope import check_id, check_tenant

__all__ = [
    "KEY_PREFIX",
    "KeyCheck",
    "KeyStore",
    "KeyStoreBase",
    "KeyStoreError",
    "NewKey",
    "ProxyKey",
    "StoredKey",
    "check_presented",
    "default_key_db",
    "new_key",
    "open_key_store",
    "parse_duration",
    "record_from_row",
]

KEY_PREFIX = "hk_"
_ID_RE = re.compile(r"[0-9a-f]{12}")
_DURATION_RE = re.compile(r"(\d+)\s*([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# Compared against when the id is unknown, so that a miss costs the same as a wrong secret.
_DUMMY_HASH = hashlib.sha256(b"headroom-no-such-key").hexdigest()


class KeyStoreError(Exception):
    """A key that cannot be created or found (bad tenant, unknown id)."""


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


@dataclass(frozen=True)
class StoredKey:
    """A key as a store keeps it: its record and the digest of its secret. What moves when keys
    are copied from one store to another (`headroom keys copy`): the clients keep their keys."""

    record: ProxyKey
    digest: str


class KeyStore(Protocol):
    """Where keys live. Thread-safe; blocking (the proxy calls it through `asyncio.to_thread`).
    `create` raises `KeyStoreError` on bad settings, `get` and `revoke` on an unknown id;
    `verify` never raises on bad input and never logs it."""

    def create(
        self, tenant: str, *, user: str | None = None, user_prefix: str | None = None,
        admin: bool = False, expires_in: timedelta | None = None, name: str | None = None,
        requests_per_minute: int | None = None, memories_per_minute: int | None = None,
    ) -> tuple[ProxyKey, str]:
        """A new key and its secret (the only time the secret exists outside the client)."""
        ...

    def list(self, tenant: str | None = None) -> list[ProxyKey]:
        """Keys by creation time (one tenant's, or all)."""
        ...

    def get(self, key_id: str) -> ProxyKey: ...

    def revoke(self, key_id: str) -> ProxyKey:
        """Idempotent: revoking a revoked key keeps its first revocation time."""
        ...

    def verify(self, presented: str) -> KeyCheck: ...

    def export(self) -> list[StoredKey]:
        """Every key, with its digest, by creation time."""
        ...

    def restore(self, keys: Iterable[StoredKey]) -> int:
        """Add the keys whose id is not here yet (revocations included); returns how many."""
        ...

    def close(self) -> None: ...

    @property
    def location(self) -> str:
        """Where the keys are, for messages (a URL without its password)."""
        ...


def default_key_db(db_path: str | Path) -> Path | str:
    """Where keys live when `--key-db` is not given: `memory.db` keeps them in `memory.keys.db`,
    in the same directory; a postgresql:// memory database keeps them in its own database, where
    every replica finds them."""
    if is_database_url(db_path):
        return str(db_path)
    path = Path(db_path)
    return path.with_name(f"{path.stem}.keys.db")


def open_key_store(target: str | Path) -> KeyStore:
    """The store at `target`: a postgresql:// URL or a SQLite file (created on first write)."""
    # Imported here: the stores build on this module's records, and psycopg is an optional
    # dependency that only a PostgreSQL key store needs.
    if is_database_url(target):
        from .keys_postgres import PgKeyStore

        return PgKeyStore(str(target))
    from .keys_sqlite import SqliteKeyStore

    return SqliteKeyStore(Path(target))


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


# --- what both stores share ----------------------------------------------------------------------


@dataclass(frozen=True)
class NewKey:
    """A key about to be stored: its record, the secret to show once and the digest to keep."""

    record: ProxyKey
    secret: str
    digest: str


def new_key(
    tenant: str, *, user: str | None, user_prefix: str | None, admin: bool,
    expires_in: timedelta | None, name: str | None, requests_per_minute: int | None,
    memories_per_minute: int | None,
) -> NewKey:
    """Check the settings (`KeyStoreError` when bad) and mint the key."""
    if user is not None and user_prefix is not None:
        raise KeyStoreError("a key binds either one user or a user prefix, not both")
    try:
        tenant = check_tenant(tenant)
        user = check_id("user", user) if user is not None else None
        user_prefix = check_id("user prefix", user_prefix) if user_prefix is not None else None
    except BadRequestError as exc:
        raise KeyStoreError(exc.message) from None
    for label, limit in (("requests", requests_per_minute), ("memories", memories_per_minute)):
        if limit is not None and limit < 0:
            raise KeyStoreError(f"{label} per minute must be 0 or more")
    key_id = secrets.token_hex(6)
    secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    now = _now()
    record = ProxyKey(
        id=key_id, tenant=tenant, user=user, user_prefix=user_prefix, admin=admin, name=name,
        requests_per_minute=requests_per_minute, memories_per_minute=memories_per_minute,
        created_at=now, expires_at=now + expires_in if expires_in is not None else None,
        revoked_at=None,
    )
    return NewKey(record, secret, _digest(secret))


class KeyStoreBase:
    """What every key store does the same way; a store supplies `_insert` and `_row`."""

    def _insert(self, key: StoredKey) -> None:
        raise NotImplementedError

    def _row(self, key_id: str) -> Any:
        raise NotImplementedError

    def create(
        self, tenant: str, *, user: str | None = None, user_prefix: str | None = None,
        admin: bool = False, expires_in: timedelta | None = None, name: str | None = None,
        requests_per_minute: int | None = None, memories_per_minute: int | None = None,
    ) -> tuple[ProxyKey, str]:
        minted = new_key(
            tenant, user=user, user_prefix=user_prefix, admin=admin, expires_in=expires_in,
            name=name, requests_per_minute=requests_per_minute,
            memories_per_minute=memories_per_minute,
        )
        self._insert(StoredKey(minted.record, minted.digest))
        return minted.record, minted.secret

    def get(self, key_id: str) -> ProxyKey:
        row = self._row(key_id)
        if row is None:
            raise KeyStoreError(f"no key with id {key_id!r}")
        return record_from_row(row)


def check_presented(presented: str, lookup: Callable[[str], Any]) -> KeyCheck:
    """Check a presented key against the row `lookup(id)` finds (indexed by column name; None:
    no such key; not called for a string that is no key). A miss and a wrong secret cost the
    same comparison."""
    key_id = _key_id(presented)
    row = lookup(key_id) if key_id is not None else None
    stored = row["secret_sha256"] if row is not None else _DUMMY_HASH
    if not hmac.compare_digest(stored, _digest(presented)) or row is None:
        return KeyCheck(None, "unknown")
    record = record_from_row(row)
    status = record.status()
    return KeyCheck(record if status == "active" else None,
                    None if status == "active" else status)


def record_from_row(row: Any) -> ProxyKey:
    """A stored row (the same columns in both stores; times as datetimes or ISO text)."""
    return ProxyKey(
        id=row["id"], tenant=row["tenant"], user=row["user_id"], user_prefix=row["user_prefix"],
        admin=bool(row["admin"]), name=row["name"],
        requests_per_minute=row["requests_per_minute"],
        memories_per_minute=row["memories_per_minute"],
        created_at=_as_time(row["created_at"]),
        expires_at=_time(row["expires_at"]), revoked_at=_time(row["revoked_at"]),
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _as_time(value: str | datetime) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def _time(value: str | datetime | None) -> datetime | None:
    return _as_time(value) if value else None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _key_id(presented: str) -> str | None:
    if not presented.startswith(KEY_PREFIX):
        return None
    key_id, sep, _ = presented[len(KEY_PREFIX):].partition("_")
    return key_id if sep and _ID_RE.fullmatch(key_id) else None
