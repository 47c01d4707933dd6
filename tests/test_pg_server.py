"""The session's PostgreSQL (tests/pg.py): pgvector is there, modules and tests are isolated."""

from __future__ import annotations

from urllib.parse import urlsplit

import psycopg

from tests.pg import PgServer, pg_database, pg_schema_url, pg_server  # noqa: F401


def test_the_server_has_pgvector(pg_database: str) -> None:  # noqa: F811
    with psycopg.connect(pg_database) as conn:
        version = conn.execute("SHOW server_version_num").fetchone()
        vector = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        ).fetchone()
        distance = conn.execute("SELECT '[1,0]'::vector <=> '[0,1]'::vector").fetchone()
    assert version is not None and int(version[0]) >= 160000
    assert vector is not None and tuple(map(int, vector[0].split("."))) >= (0, 6, 0)
    assert distance is not None and distance[0] == 1.0


def test_each_test_gets_an_empty_schema_of_its_own(pg_schema_url: str) -> None:  # noqa: F811
    with psycopg.connect(pg_schema_url, autocommit=True) as conn:
        schema = conn.execute("SELECT current_schema()").fetchone()
        conn.execute("CREATE TABLE t (v vector(2))")
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
        ).fetchone()
    assert schema is not None and schema[0].startswith("s")
    assert tables == (1,)


def test_a_new_database_is_empty_and_separate(pg_server: PgServer, pg_database: str) -> None:  # noqa: F811
    other = pg_server.create_database("other")
    try:
        assert other != pg_database
        with psycopg.connect(other) as conn:
            tables = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            ).fetchone()
        assert tables == (0,)
    finally:
        pg_server.drop_database(other)
    name = urlsplit(other).path.lstrip("/")
    with psycopg.connect(pg_server.url) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
    assert left == (0,)
