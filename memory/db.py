"""The SQLite connection factory: one place for the platform quirks and for SQLite's failures.

Python's stdlib `sqlite3` cannot load extensions on many builds (this project's CI machine, macOS's
system Python). We use it when it can, and otherwise `sqlean` (a drop-in build with FTS5 and
extension loading). Every connection gets sqlite-vec, WAL, a busy timeout and foreign keys.
Each thread gets its own connection: SQLite connections must not be shared across threads.

Failures of the medium rather than of the code (disk full, I/O error, read-only file, a lock
held past the busy timeout, a corrupt file) leave this module as `StorageError`, with a short
`reason` and the file's name: every connection it hands out is a `GuardedConnection`, so no
adapter translates errors itself. Bugs (bad SQL, constraint violations) keep their own types.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import StorageError

log = logging.getLogger(__name__)

__all__ = [
    "Database", "GuardedConnection", "GuardedCursor", "connect", "sqlite_module",
    "sqlite_versions", "storage_error",
]

_BUSY_TIMEOUT_MS = 30_000

# SQLite's primary result codes (the low byte of an extended code) that mean the medium failed.
_REASONS = {
    5: "locked",  # SQLITE_BUSY: another connection held the write lock past the busy timeout
    6: "locked",  # SQLITE_LOCKED
    7: "out of memory",  # SQLITE_NOMEM
    8: "read-only",  # SQLITE_READONLY
    10: "I/O error",  # SQLITE_IOERR
    11: "corrupt",  # SQLITE_CORRUPT
    13: "disk full",  # SQLITE_FULL (also a file at its PRAGMA max_page_count)
    14: "cannot open",  # SQLITE_CANTOPEN
    26: "corrupt",  # SQLITE_NOTADB
}
# For exceptions without `sqlite_errorcode` (Python < 3.11): SQLite's standard messages.
_MESSAGES = (
    ("database or disk is full", "disk full"),
    ("disk i/o error", "I/O error"),
    ("readonly database", "read-only"),
    ("database is locked", "locked"),
    ("database table is locked", "locked"),
    ("malformed", "corrupt"),
    ("file is not a database", "corrupt"),
    ("unable to open database", "cannot open"),
)
_ADVICE = {
    "disk full": "free space on its disk or raise its size limit; queued writes wait for room",
    "I/O error": "check the disk and the filesystem it is on",
    "read-only": "the file, its folder or its filesystem cannot be written",
    "locked": f"another process held it past the {_BUSY_TIMEOUT_MS // 1000}s busy timeout",
    "corrupt": "restore it from a backup, or export what still reads and import it anew",
    "cannot open": "check that the path exists and can be read",
    "out of memory": "SQLite ran out of memory",
}


def storage_error(exc: BaseException, path: str) -> StorageError | None:
    """The `StorageError` for a SQLite exception that means the medium failed, else None."""
    if isinstance(exc, StorageError):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    reason = _REASONS.get(code & 0xFF) if isinstance(code, int) else None
    if reason is None:
        text = str(exc).lower()
        reason = next((r for needle, r in _MESSAGES if needle in text), None)
    if reason is None:
        return None
    return StorageError(
        f"database {path}: {reason} ({exc}): {_ADVICE[reason]}", reason=reason, path=path
    )


def _translated(exc: Exception, path: str) -> Exception:
    return storage_error(exc, path) or exc


class GuardedCursor:
    """A cursor whose fetches raise `StorageError` for medium failures (see the module doc)."""

    __slots__ = ("_cursor", "_path")

    def __init__(self, cursor: Any, path: str) -> None:
        self._cursor = cursor
        self._path = path

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid  # type: ignore[no-any-return]

    @property
    def description(self) -> Any:
        return self._cursor.description

    def fetchone(self) -> Any:
        try:
            return self._cursor.fetchone()
        except Exception as exc:
            raise _translated(exc, self._path) from exc

    def fetchall(self) -> list[Any]:
        try:
            return self._cursor.fetchall()  # type: ignore[no-any-return]
        except Exception as exc:
            raise _translated(exc, self._path) from exc

    def fetchmany(self, size: int = 1) -> list[Any]:
        try:
            return self._cursor.fetchmany(size)  # type: ignore[no-any-return]
        except Exception as exc:
            raise _translated(exc, self._path) from exc

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                row = self._cursor.fetchone()
            except Exception as exc:
                raise _translated(exc, self._path) from exc
            if row is None:
                return
            yield row

    def close(self) -> None:
        self._cursor.close()


class GuardedConnection:
    """A SQLite connection whose statements raise `StorageError` for medium failures; other
    attributes (`in_transaction`, `row_factory`, `close`, ...) are the wrapped connection's."""

    def __init__(self, raw: Any, path: str) -> None:
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "path", path)

    def execute(self, sql: str, params: Any = ()) -> GuardedCursor:
        try:
            return GuardedCursor(self.raw.execute(sql, params), self.path)
        except Exception as exc:
            raise _translated(exc, self.path) from exc

    def executemany(self, sql: str, seq: Any) -> GuardedCursor:
        try:
            return GuardedCursor(self.raw.executemany(sql, seq), self.path)
        except Exception as exc:
            raise _translated(exc, self.path) from exc

    def executescript(self, script: str) -> GuardedCursor:
        try:
            return GuardedCursor(self.raw.executescript(script), self.path)
        except Exception as exc:
            raise _translated(exc, self.path) from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.raw, name, value)


def _can_load_extensions(module: ModuleType) -> bool:
    try:
        conn = module.connect(":memory:")
    except Exception:  # pragma: no cover - a broken build
        return False
    try:
        conn.enable_load_extension(True)
        return True
    except Exception:
        return False
    finally:
        conn.close()


_module: ModuleType | None = None


def sqlite_module() -> ModuleType:
    """stdlib sqlite3 if it can load extensions, else sqlean; resolved once per process."""
    global _module
    if _module is None:
        import sqlite3

        if _can_load_extensions(sqlite3):
            _module = sqlite3
        else:
            try:
                import sqlean
            except ImportError as exc:  # pragma: no cover - sqlean is a dependency
                raise StorageError(
                    "this Python's sqlite3 cannot load extensions and sqlean-py is not "
                    "installed: pip install sqlean-py"
                ) from exc
            _module = sqlean
    return _module


def connect(path: str | Path, *, readonly: bool = False) -> GuardedConnection:
    """Open `path` with sqlite-vec loaded and WAL on. Raises StorageError with a fix on failure."""
    import sqlite_vec

    module = sqlite_module()
    target = str(path)
    try:
        if target != ":memory:":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        if readonly:
            raw = module.connect(
                f"file:{target}?mode=ro", uri=True, check_same_thread=False,
                isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000,
            )
        else:
            raw = module.connect(
                target, check_same_thread=False, isolation_level=None,
                timeout=_BUSY_TIMEOUT_MS / 1000,
            )
    except Exception as exc:
        known = storage_error(exc, target)
        raise StorageError(
            f"cannot open database {target}: {exc}",
            reason=known.reason if known else "cannot open", path=target,
        ) from exc
    try:
        raw.enable_load_extension(True)
        sqlite_vec.load(raw)
        raw.enable_load_extension(False)
    except Exception as exc:
        raw.close()
        raise StorageError(f"cannot load sqlite-vec into SQLite: {exc}", path=target) from exc
    raw.row_factory = module.Row
    conn = GuardedConnection(raw, target)
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        # Deleted content is overwritten, so a purge leaves no readable trace in the file.
        conn.execute("PRAGMA secure_delete = ON")
        if not readonly and target != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
    except Exception as exc:
        raw.close()
        known = storage_error(exc, target)
        raise StorageError(
            f"cannot open database {target}: {exc}",
            reason=known.reason if known else "cannot open", path=target,
        ) from exc
    return conn


def sqlite_versions() -> dict[str, str]:
    conn = connect(":memory:")
    try:
        sqlite_version, vec_version = conn.execute(
            "select sqlite_version(), vec_version()"
        ).fetchone()
        fts5 = bool(conn.execute("select sqlite_compileoption_used('ENABLE_FTS5')").fetchone()[0])
    finally:
        conn.close()
    return {
        "module": sqlite_module().__name__,
        "sqlite": sqlite_version,
        "sqlite_vec": vec_version,
        "fts5": str(fts5),
    }


class Database:
    """A database file with one connection per thread.

    Writers go through `transaction()` (BEGIN IMMEDIATE, so two processes never deadlock on lock
    upgrades); the engine keeps all writes on one thread and reads on others, which WAL allows to
    run concurrently. `max_bytes` caps the file (SQLite's `max_page_count`, per connection): past
    it writes fail as `StorageError(reason="disk full")`, which is also how tests fill a disk.
    """

    def __init__(self, path: str | Path, *, max_bytes: int | None = None) -> None:
        self.path = str(path)
        self._local = threading.local()
        self._all: list[GuardedConnection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._max_bytes = max_bytes

    @property
    def conn(self) -> GuardedConnection:
        conn: GuardedConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StorageError(f"database {self.path} is closed", path=self.path)
            conn = connect(self.path)
            if self._max_bytes is not None:
                _limit_pages(conn, self._max_bytes)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def set_max_bytes(self, max_bytes: int | None) -> None:
        """Change the size cap on every open connection and on those opened later (None lifts
        it). A cap below the database's current size holds it at that size; nothing shrinks."""
        self._max_bytes = max_bytes
        with self._lock:
            conns = list(self._all)
        for conn in conns:
            _limit_pages(conn, max_bytes)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        conn = self.conn
        if conn.in_transaction:  # nested: join the outer transaction
            yield
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")  # a full disk can show only here
        except BaseException:
            self._rollback(conn)
            raise

    def _rollback(self, conn: GuardedConnection) -> None:
        # SQLite may have rolled back by itself (after SQLITE_FULL or an I/O error), and a
        # failing ROLLBACK must not hide the error that brought us here.
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except Exception:
            log.warning("rollback failed on %s", self.path, exc_info=True)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except Exception:  # pragma: no cover - closing from another thread
                log.debug("closing a connection failed", exc_info=True)


_NO_LIMIT_PAGES = 4_294_967_294  # SQLite's largest max_page_count


def _limit_pages(conn: GuardedConnection, max_bytes: int | None) -> None:
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    pages = _NO_LIMIT_PAGES if max_bytes is None else max(1, max_bytes // page_size)
    conn.execute(f"PRAGMA max_page_count = {int(pages)}")
