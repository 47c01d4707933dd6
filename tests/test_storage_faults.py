"""SQLite's failures of the medium surface as StorageError with a reason and the file's name
(issue 9, item 3); bugs keep their own exception types; a full file works again once it has room."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from headroom.memory.adapters import SQLiteMemoryStore, SQLiteOutbox
from headroom.memory.db import Database, connect, sqlite_module, storage_error
from headroom.memory.errors import StorageError
from headroom.memory.models import Memory


def _memory(n: int, user: str = "ann") -> Memory:
    return Memory(content=f"fact number {n} " + "padding " * 100, user_id=user)


def _count(store: SQLiteMemoryStore) -> int:
    return int(store.db.conn.execute("SELECT count(*) FROM memories").fetchone()[0])


def _db_bytes(db: Database) -> int:
    """The database's size in pages, WAL included (the file itself lags until a checkpoint)."""
    pages = db.conn.execute("PRAGMA page_count").fetchone()[0]
    return int(pages) * int(db.conn.execute("PRAGMA page_size").fetchone()[0])


def _fill(store: SQLiteMemoryStore, start: int) -> tuple[int, StorageError]:
    """Write one memory per transaction until the file is full; returns how many landed."""
    for n in range(start, start + 10_000):
        try:
            with store.transaction():
                store.insert(_memory(n))
        except StorageError as exc:
            return n - start, exc
    raise AssertionError("the file never filled up")


def test_a_full_file_raises_storage_error_and_takes_writes_again_once_it_has_room(
    tmp_path: Path,
) -> None:
    path = tmp_path / "full.db"
    db = Database(path)
    store = SQLiteMemoryStore(db)
    with store.transaction():
        store.insert(_memory(0))
    db.set_max_bytes(_db_bytes(db) + 64 * 1024)
    landed, exc = _fill(store, 1)
    assert exc.reason == "disk full"
    assert str(path) in str(exc) and exc.path == str(path)
    assert "free space" in str(exc)
    assert isinstance(exc.__cause__, sqlite_module().OperationalError)
    assert _count(store) == 1 + landed  # the failed transaction left nothing half-written
    with pytest.raises(StorageError) as outbox_full:
        with store.transaction():
            SQLiteOutbox(db).put({"scope": {"user_id": "ann"}, "ops": {"add": ["x" * 50_000]}})
    assert outbox_full.value.reason == "disk full"

    db.set_max_bytes(None)
    with store.transaction():
        store.insert(_memory(99_999))
        oid = store.outbox.put({"scope": {"user_id": "ann"}, "ops": {"add": ["later"]}})
    assert _count(store) == 2 + landed
    assert [row[0] for row in store.outbox.claim(5, "w", lease_s=30)] == [oid]
    db.close()


def test_the_size_cap_applies_to_connections_of_other_threads(tmp_path: Path) -> None:
    path = tmp_path / "capped.db"
    db = Database(path)
    store = SQLiteMemoryStore(db)
    cap = _db_bytes(db) + 32 * 1024
    db.set_max_bytes(cap)
    caught: list[BaseException] = []

    def write_elsewhere() -> None:  # a new connection, opened after the cap was set
        try:
            _fill(store, 0)
        except BaseException as exc:  # surfaced below
            caught.append(exc)

    worker = threading.Thread(target=write_elsewhere)
    worker.start()
    worker.join(30)
    assert caught == []  # _fill returned: the thread's writes hit the cap
    db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert path.stat().st_size <= cap
    db.close()


def test_writing_a_read_only_connection_is_a_read_only_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    db = Database(path)
    SQLiteMemoryStore(db)
    db.close()
    conn = connect(path, readonly=True)
    try:
        with pytest.raises(StorageError) as caught:
            conn.execute("INSERT INTO settings(key, value) VALUES ('a', 'b')")
        assert caught.value.reason == "read-only"
        assert str(path) in str(caught.value)
    finally:
        conn.close()


def test_a_lock_held_past_the_busy_timeout_is_a_locked_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    holder = Database(path)
    SQLiteMemoryStore(holder)
    waiter = Database(path)
    waiter.conn.execute("PRAGMA busy_timeout = 50")  # the default waits 30 s
    with holder.transaction():
        holder.conn.execute("INSERT INTO settings(key, value) VALUES ('k', 'v')")
        with pytest.raises(StorageError) as caught, waiter.transaction():
            pass
    assert caught.value.reason == "locked"
    assert "busy timeout" in str(caught.value)
    with waiter.transaction():  # free again once the holder committed
        waiter.conn.execute("UPDATE settings SET value = 'w' WHERE key = 'k'")
    holder.close()
    waiter.close()


def test_a_file_that_is_not_a_database_is_a_corrupt_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not SQLite " * 500)
    with pytest.raises(StorageError) as caught:
        SQLiteMemoryStore(Database(path))
    assert caught.value.reason == "corrupt"
    assert str(path) in str(caught.value)


def test_an_io_error_code_maps_to_its_reason() -> None:
    # SQLITE_IOERR_WRITE (778): an extended code whose low byte is SQLITE_IOERR.
    exc = sqlite_module().OperationalError("disk I/O error")
    exc.sqlite_errorcode = 778
    mapped = storage_error(exc, "/data/m.db")
    assert mapped is not None and mapped.reason == "I/O error" and "/data/m.db" in str(mapped)
    # Without an error code (older Pythons), SQLite's message is enough.
    assert storage_error(sqlite_module().OperationalError("database or disk is full"), "x")


def test_bugs_are_not_storage_errors(tmp_path: Path) -> None:
    db = Database(tmp_path / "bugs.db")
    SQLiteMemoryStore(db)
    module = sqlite_module()
    with pytest.raises(module.OperationalError) as bad_sql:
        db.conn.execute("SELECT nope FROM nowhere")
    assert not isinstance(bad_sql.value, StorageError)
    db.conn.execute("INSERT INTO settings(key, value) VALUES ('k', 'v')")
    with pytest.raises(module.IntegrityError):
        db.conn.execute("INSERT INTO settings(key, value) VALUES ('k', 'again')")
    db.close()
