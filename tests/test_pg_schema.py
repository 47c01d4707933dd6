"""Opening a PostgreSQL database: replicas migrating at once, and the one-line errors for a wrong
URL, wrong credentials, a server without pgvector and a server that went away."""

from __future__ import annotations

import threading
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from headroom.memory.adapters.postgres import (
    PostgresMemoryStore,
    is_postgres_url,
    open_database,
    redact_url,
)
from headroom.memory.adapters.postgres.schema import MIGRATIONS
from headroom.memory.errors import StorageError
from headroom.memory.models import Memory
from tests.pg import PgServer, pg_database, pg_schema_url, pg_server  # noqa: F401 (fixtures)


def test_replicas_opening_at_once_apply_each_migration_once(pg_schema_url: str) -> None:  # noqa: F811
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []
    opened = []

    def start() -> None:
        try:
            barrier.wait(timeout=30)
            opened.append(open_database(pg_schema_url, pool_size=1))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(opened) == 6
    names = opened[0].fetchall("SELECT name FROM schema_version ORDER BY name")
    assert [n for (n,) in names] == [name for name, _ in MIGRATIONS]
    store = PostgresMemoryStore(opened[-1])
    rid = store.insert(Memory(content="works", user_id="ann"))
    assert PostgresMemoryStore(opened[0]).get_by_rowids([rid])[rid].content == "works"
    for db in opened:
        db.close()


def test_postgres_urls_are_told_apart_from_files() -> None:
    assert is_postgres_url("postgresql://u@h/db") and is_postgres_url("postgres://h/db")
    assert not is_postgres_url("/var/lib/headroom/memory.db")
    assert not is_postgres_url(":memory:")
    assert redact_url("postgresql://ann:s3cret@db.example:5432/m") == (
        "postgresql://ann:***@db.example:5432/m"
    )


def test_a_server_that_is_not_there_is_one_clear_error(tmp_path: object) -> None:
    with pytest.raises(StorageError) as caught:
        open_database(f"postgresql://nobody@/db?host={tmp_path}", timeout_s=2)
    message = str(caught.value)
    assert message.startswith("cannot connect to postgresql://nobody@/db")
    assert "\n" not in message
    assert caught.value.reason == "cannot open"


def test_wrong_credentials_name_the_database_without_the_password(
    pg_server: PgServer, pg_database: str,  # noqa: F811
) -> None:
    parts = urlsplit(pg_database)
    wrong = urlunsplit(parts._replace(netloc="no_such_role:hunter2@"))
    with pytest.raises(StorageError) as caught:
        open_database(wrong, timeout_s=5)
    message = str(caught.value)
    assert "no_such_role" in message and "hunter2" not in message
    assert "\n" not in message


def test_a_database_without_pgvector_says_how_to_fix_it(pg_server: PgServer) -> None:  # noqa: F811
    """A role that may not create extensions, on a database that lacks pgvector."""
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE no_vector TEMPLATE template0")
        conn.execute("CREATE ROLE plain LOGIN")
        conn.execute("ALTER DATABASE no_vector OWNER TO plain")
    try:
        url = urlunsplit(urlsplit(pg_server.database_url("no_vector"))._replace(
            netloc="plain@"))
        with pytest.raises(StorageError, match="no pgvector extension") as caught:
            open_database(url, timeout_s=5)
        assert "CREATE EXTENSION vector" in str(caught.value)
    finally:
        with psycopg.connect(pg_server.url, autocommit=True) as conn:
            conn.execute("DROP DATABASE no_vector WITH (FORCE)")
            conn.execute("DROP ROLE plain")


def test_a_dropped_connection_is_a_storage_error_and_the_pool_recovers(
    pg_schema_url: str, pg_server: PgServer,  # noqa: F811
) -> None:
    db = open_database(pg_schema_url, pool_size=1)
    store = PostgresMemoryStore(db)
    try:
        with pytest.raises(StorageError) as caught, store.transaction():
            store.insert(Memory(content="lost with the connection", user_id="ann"))
            pid = db.scalar("SELECT pg_backend_pid()")
            with psycopg.connect(pg_server.url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            store.insert(Memory(content="after the drop", user_id="ann"))
        assert caught.value.reason == "unavailable"
        rid = store.insert(Memory(content="next write", user_id="ann"))  # a fresh connection
        assert store.get_by_rowids([rid])[rid].content == "next write"
        assert [m.content for m in store.iter_all("ann")] == ["next write"]
    finally:
        db.close()
