"""`db_path="postgresql://…"` selects the PostgreSQL family everywhere: the engine's wiring (HNSW
settings, the recorded model, stats without the password) and every CLI command's `--db`, with
one `error: …` line for a wrong URL, wrong credentials or a server without pgvector.

The engine's own suites run on PostgreSQL through conftest's backend parametrisation; this module
covers what only a URL has."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from typer.testing import CliRunner, Result

from headroom import cli
from headroom.memory.adapters.postgres import (
    PgNotifyCache,
    PgTextIndex,
    PgVectorIndex,
    PostgresMemoryStore,
)
from headroom.memory.errors import ConfigError
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.inspect_db import RecordedModel, recorded_model
from headroom.memory.models import MemoryConfig, is_database_url
from tests.fakes import FakeEmbedder
from tests.pg import PgServer, pg_database, pg_schema_url, pg_server  # noqa: F401 (fixtures)


def _with_password(url: str, password: str) -> str:
    """`url` with a password (the test server trusts local connections, so any one works)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname or ''}"))


async def test_a_postgresql_url_builds_the_postgres_family(pg_schema_url: str) -> None:  # noqa: F811
    config = MemoryConfig(
        db_path=pg_schema_url, hnsw_m=8, hnsw_ef_construction=32, hnsw_ef_search=20
    )
    mem = await HierarchicalMemory.create(config, embedder=FakeEmbedder())
    try:
        parts = mem._parts
        assert isinstance(parts.store, PostgresMemoryStore)
        assert isinstance(parts.text, PgTextIndex)
        assert isinstance(parts.cache, PgNotifyCache)
        assert isinstance(parts.vectors, PgVectorIndex)
        assert (parts.vectors.m, parts.vectors.ef_construction, parts.vectors.ef_search) == (
            8, 32, 20,
        )
        added = await mem.add("I live in Lisbon", user_id="alice")
        found = await mem.search("where do I live, Lisbon?", user_id="alice")
        assert [r.memory.id for r in found] == [added.id]
    finally:
        await mem.close()


async def test_the_postgres_scheme_alias_and_no_cache(pg_schema_url: str) -> None:  # noqa: F811
    url = pg_schema_url.replace("postgresql://", "postgres://", 1)
    assert is_database_url(url)
    mem = await HierarchicalMemory.create(
        MemoryConfig(db_path=url, cache_enabled=False), embedder=FakeEmbedder()
    )
    try:
        assert isinstance(mem._parts.store, PostgresMemoryStore)
        assert mem._parts.cache is None
    finally:
        await mem.close()


def test_hnsw_settings_keep_their_clear_error_on_sqlite(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="hnsw_\\* options are not supported"):
        MemoryConfig(db_path=tmp_path / "m.db", hnsw_m=8)
    with pytest.raises(ConfigError, match="must be positive"):
        MemoryConfig(db_path="postgresql://u@h/db", hnsw_ef_search=0)


async def test_stats_name_the_database_without_its_password(pg_schema_url: str) -> None:  # noqa: F811
    url = _with_password(pg_schema_url, "hunter2")
    mem = await HierarchicalMemory.create(MemoryConfig(db_path=url), embedder=FakeEmbedder())
    try:
        await mem.add("I live in Lisbon", user_id="alice")
        stats = await mem.stats()
    finally:
        await mem.close()
    assert "hunter2" not in stats["db_path"] and ":***@" in stats["db_path"]
    with psycopg.connect(pg_schema_url) as conn:
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert size is not None
    # The module's database only grows while the test runs; a few pages of slack.
    assert 0 < stats["db_bytes"] <= size[0] and stats["db_bytes"] > size[0] - 1_000_000
    assert stats["current"] == 1 and stats["vectors"] == 1


async def test_another_embedder_is_refused_naming_the_url_without_password(
    pg_schema_url: str,  # noqa: F811
) -> None:
    url = _with_password(pg_schema_url, "hunter2")
    mem = await HierarchicalMemory.create(MemoryConfig(db_path=url), embedder=FakeEmbedder())
    await mem.add("I live in Lisbon", user_id="alice")
    await mem.close()
    with pytest.raises(ConfigError, match="was built with embedder fake:") as caught:
        await HierarchicalMemory.create(
            MemoryConfig(db_path=url), embedder=FakeEmbedder(32, "fake:bow-32")
        )
    assert "hunter2" not in str(caught.value)
    assert recorded_model(url) == RecordedModel(FakeEmbedder().model_id, FakeEmbedder().dimension)


# --- the command line -------------------------------------------------------------------------


@pytest.fixture
def hr(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """`headroom ARGS` in-process on the fake embedder; `expect` is the exit code."""
    import headroom.memory.embedders

    monkeypatch.setattr(headroom.memory.embedders, "make_embedder", lambda config: FakeEmbedder())
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()

    def invoke(*args: str, expect: int = 0) -> Result:
        result = runner.invoke(cli.app, list(args), catch_exceptions=False)
        assert result.exit_code == expect, (result.stdout, result.stderr)
        return result

    yield invoke


def test_every_memories_command_takes_a_postgresql_url(hr: Any, pg_schema_url: str) -> None:  # noqa: F811
    db = ("--db", pg_schema_url)
    added = json.loads(hr("memories", "add", "I live in Lisbon", "-u", "alice", *db, "--json")
                       .stdout)
    listed = json.loads(hr("memories", "list", "-u", "alice", *db, "--json").stdout)
    assert [m["id"] for m in listed] == [added["id"]]
    found = hr("memories", "search", "Lisbon", "-u", "alice", "--mode", "text", *db, "--json")
    assert added["id"] in found.stdout
    stats = json.loads(hr("stats", *db, "--json").stdout)
    assert stats["users"] == {"alice": 1} and stats["db_path"] == pg_schema_url
    hr("memories", "forget", added["id"], *db)
    assert json.loads(hr("memories", "list", "-u", "alice", *db, "--json").stdout) == []


def test_the_environment_variable_takes_a_url_too(
    hr: Any, pg_schema_url: str, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    monkeypatch.setenv("HEADROOM_DB", pg_schema_url)
    hr("memories", "add", "I live in Lisbon", "-u", "alice")
    assert json.loads(hr("stats", "--json").stdout)["current"] == 1


def _one_error_line(result: Result, *fragments: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_a_wrong_url_is_one_error_line(hr: Any, pg_server: PgServer, tmp_path: Path) -> None:  # noqa: F811
    missing = pg_server.database_url("no_such_database")
    _one_error_line(hr("stats", "--db", missing, expect=1), "cannot connect", "no_such_database")
    nobody = f"postgresql://nobody@/db?host={tmp_path}&connect_timeout=2"
    _one_error_line(hr("memories", "list", "-u", "a", "--db", nobody, expect=1), "cannot connect")


def test_wrong_credentials_are_one_line_without_the_password(
    hr: Any, pg_database: str,  # noqa: F811
) -> None:
    parts = urlsplit(pg_database)
    wrong = urlunsplit(parts._replace(netloc="no_such_role:hunter2@"))
    line = _one_error_line(hr("stats", "--db", wrong, expect=1), "no_such_role")
    assert "hunter2" not in line


def test_a_server_without_pgvector_is_one_line_with_the_fix(
    hr: Any, pg_server: PgServer,  # noqa: F811
) -> None:
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE cli_no_vector TEMPLATE template0")
        conn.execute("CREATE ROLE cli_plain LOGIN")
        conn.execute("ALTER DATABASE cli_no_vector OWNER TO cli_plain")
    try:
        url = urlunsplit(
            urlsplit(pg_server.database_url("cli_no_vector"))._replace(netloc="cli_plain@")
        )
        _one_error_line(
            hr("memories", "add", "x", "-u", "a", "--db", url, expect=1),
            "no pgvector extension", "CREATE EXTENSION vector",
        )
    finally:
        with psycopg.connect(pg_server.url, autocommit=True) as conn:
            conn.execute("DROP DATABASE cli_no_vector WITH (FORCE)")
            conn.execute("DROP ROLE cli_plain")
