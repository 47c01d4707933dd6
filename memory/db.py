"""The SQLite connection factory: one place for the platform quirks.

Python's stdlib `sqlite3` cannot load extensions on many builds (this project's CI machine, macOS's
system Python). We use it when it can, and otherwise `sqlean` (a drop-in build with FTS5 and
extension loading). Every connection gets sqlite-vec, WAL, a busy timeout and foreign keys.
Each thread gets its own connection: SQLite connections must not be shared across threads.
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

__all__ = ["Database", "connect", "sqlite_module", "sqlite_versions"]

_BUSY_TIMEOUT_MS = 30_000


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


def connect(path: str | Path, *, readonly: bool = False) -> Any:
    """Open `path` with sqlite-vec loaded and WAL on. Raises StorageError with a fix on failure."""
    import sqlite_vec

    module = sqlite_module()
    target = str(path)
    try:
        if target != ":memory:":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        if readonly:
            conn = module.connect(
                f"file:{target}?mode=ro", uri=True, check_same_thread=False,
                isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000,
            )
        else:
            conn = module.connect(
                target, check_same_thread=False, isolation_level=None,
                timeout=_BUSY_TIMEOUT_MS / 1000,
            )
    except Exception as exc:
        raise StorageError(f"cannot open database {target}: {exc}") from exc
    try:
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
    except Exception as exc:
        conn.close()
        raise StorageError(f"cannot load sqlite-vec into SQLite: {exc}") from exc
    conn.row_factory = module.Row
    conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    # Deleted content is overwritten, so a purge leaves no readable trace in the file.
    conn.execute("PRAGMA secure_delete = ON")
    if not readonly and target != ":memory:":
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except Exception as exc:
            conn.close()
            raise StorageError(f"cannot open database {target}: {exc}") from exc
        conn.execute("PRAGMA synchronous = NORMAL")
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
    run concurrently.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StorageError(f"database {self.path} is closed")
            conn = connect(self.path)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[None]:
        conn = self.conn
        if conn.in_transaction:  # nested: join the outer transaction
            yield
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        self._closed = True
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except Exception:  # pragma: no cover - closing from another thread
                log.debug("closing a connection failed", exc_info=True)
