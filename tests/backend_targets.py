"""Fresh storage locations for a test on each backend: a file under the test's directory on the
SQLite leg, a new schema of the module's PostgreSQL database (tests/pg.py) on the PostgreSQL leg.
For what the engine does not open itself: key stores, and databases handed to a server process
(which conftest's in-process mapping of files to schemas cannot reach)."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest

from tests.pg import schema_url

__all__ = ["database_target", "key_target"]


def database_target(
    request: pytest.FixtureRequest, backend: str, directory: Path, name: str = "p.db"
) -> Path | str:
    """`directory / name` on SQLite; on PostgreSQL the URL of a new, empty schema."""
    if backend == "sqlite":
        return directory / name
    database: str = request.getfixturevalue("pg_database")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return schema_url(database, schema)


def key_target(request: pytest.FixtureRequest, backend: str, directory: Path) -> Path | str:
    """A fresh, empty key store location for `backend` ("sqlite" or "postgres")."""
    return database_target(request, backend, directory, f"k-{uuid.uuid4().hex[:8]}.keys.db")
