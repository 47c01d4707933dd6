"""A real PostgreSQL (16.2 with pgvector 0.6.2, from the `pgserver` wheel) for the test session.

One private server per session in a temp dir, a fresh database per test module and a fresh schema
per test, so the PostgreSQL storage family runs the same suites as SQLite without a container
engine. Set `HEADROOM_TEST_PG_URL` (a libpq URL of a superuser on a server with pgvector) to use
your own server instead: each module still gets its own database, dropped afterwards.

PostgreSQL refuses to run as root. As root, `pgserver` itself would `useradd` a user and chmod
every parent folder of its install (here /root) world-readable; instead the bundled binaries are
copied into the session's temp dir and run as `nobody`, which changes nothing outside that dir.
Startup (copy, initdb, start) measured ~2 s. If the server cannot start the fixture fails with
the server's log; nothing is skipped.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest

from headroom.memory.adapters.postgres import PgDatabase, open_database

__all__ = [
    "PgServer", "fresh_schema", "pg_database", "pg_db", "pg_schema_url", "pg_server",
    "schema_url", "start_private_server",
]

ENV_URL = "HEADROOM_TEST_PG_URL"
_RUN_AS = "nobody"
# Durability is not under test: a crash-safe flush per commit would only slow every test down.
_FAST = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
_ids = itertools.count(1)


@dataclass
class PgServer:
    """A running server: `url` reaches its `postgres` database as a superuser."""

    url: str
    stop: Callable[[], None]

    def database_url(self, name: str) -> str:
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path="/" + name))

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database with the vector extension; returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = self.database_url(name)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        return url

    def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pgserver_root() -> Path:
    """The folder holding `pgserver/pginstall` and the `pgserver.libs` its binaries link to."""
    # Located, not imported: importing pgserver resolves a runtime dir and warns without one.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise RuntimeError("the PostgreSQL tests need the pgserver wheel: pip install pgserver")
    return Path(spec.origin).resolve().parent.parent


def _run(cmd: list[str], *, user: str | None, log: Path | None = None) -> None:
    result = subprocess.run(
        cmd, user=user, capture_output=True, text=True, timeout=60, check=False,
    )
    if result.returncode != 0:
        server_log = log.read_text(errors="replace") if log and log.exists() else ""
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
            f"{server_log}"
        )


def start_private_server(base: Path) -> PgServer:
    """initdb and start a server under `base`, listening on a Unix socket only."""
    root = _pgserver_root()
    user: str | None = None
    if os.geteuid() == 0:
        user = _RUN_AS
        copy = base / "install"
        shutil.copytree(root / "pgserver" / "pginstall", copy / "pgserver" / "pginstall")
        shutil.copytree(root / "pgserver.libs", copy / "pgserver.libs")
        root = copy
    bin_dir = root / "pgserver" / "pginstall" / "bin"
    data, sock = base / "data", base / "sock"
    data.mkdir()
    sock.mkdir()
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (base, *base.rglob("*")):
            os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
        base.chmod(0o755)
    log = base / "server.log"
    _run(
        [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "utf8",
         "--no-sync", "--no-instructions"],
        user=user,
    )
    _run(
        [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
         "-o", f"-k {sock} -c listen_addresses= {_FAST}", "start"],
        user=user, log=log,
    )

    def stop() -> None:
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
             user=user, log=log)

    url = f"postgresql://postgres@/postgres?host={quote(str(sock), safe='/')}"
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            # New databases copy template1: every one has pgvector from the start.
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector", prepare=False)
            with psycopg.connect(
                url.replace("/postgres?", "/template1?"), autocommit=True
            ) as template:
                template.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except BaseException:
        stop()
        raise
    return PgServer(url, stop)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    external = os.environ.get(ENV_URL)
    if external:
        yield PgServer(external, stop=lambda: None)
        return
    base = Path(tempfile.mkdtemp(prefix="headroom-pg-"))
    try:
        server = start_private_server(base)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_database(pg_server: PgServer) -> Iterator[str]:
    """A fresh database for the requesting module (its URL), dropped after it."""
    url = pg_server.create_database()
    try:
        yield url
    finally:
        pg_server.drop_database(url)


def schema_url(database_url: str, schema: str) -> str:
    """`database_url` with `schema` first on every connection's search path (public after it,
    where pgvector's type lives)."""
    options = quote(f"-csearch_path={schema},public", safe="")
    sep = "&" if "?" in database_url else "?"
    return f"{database_url}{sep}options={options}"


@contextmanager
def fresh_schema(database_url: str) -> Iterator[str]:
    """A new empty schema in `database_url`'s database: the URL of a backend that sees nothing
    else. Dropped afterwards, with what was left in it."""
    schema = f"s{next(_ids)}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema_url(database_url, schema)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pg_schema_url(pg_database: str) -> Iterator[str]:
    """A fresh empty schema in the module's database for one test (see `fresh_schema`)."""
    with fresh_schema(pg_database) as url:
        yield url


@pytest.fixture
def pg_db(pg_schema_url: str) -> Iterator[PgDatabase]:
    """An open database (a pool of 4 connections) on a fresh schema, closed afterwards."""
    database = open_database(pg_schema_url, pool_size=4)
    try:
        yield database
    finally:
        database.close()
