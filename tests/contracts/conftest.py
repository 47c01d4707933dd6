"""Fixtures handing each contract test its implementation, parametrised over the registries in
tests/contracts/backends.py (add a backend there)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from headroom.memory.ports import Embedder, MemoryCache, MemoryStore, TextIndex, VectorIndex
from tests.contracts.backends import CACHES, DIMENSION, EMBEDDERS, STORAGE, Storage
from tests.pg import pg_database, pg_schema_url, pg_server  # noqa: F401 (fixtures)


@pytest.fixture(params=sorted(STORAGE))
def storage(request: pytest.FixtureRequest) -> Iterator[Storage]:
    backend = STORAGE[request.param](request, DIMENSION)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def store(storage: Storage) -> MemoryStore:
    return storage.store


@pytest.fixture
def vectors(storage: Storage) -> VectorIndex:
    return storage.vectors


@pytest.fixture
def text(storage: Storage) -> TextIndex:
    return storage.text


@pytest.fixture(params=sorted(CACHES))
def make_cache(request: pytest.FixtureRequest) -> Callable[[int], MemoryCache]:
    """A cache factory taking its capacity (`max_size`), since capacity is part of the contract."""
    factory = CACHES[request.param]
    return lambda max_size: factory(request, max_size)


@pytest.fixture(params=sorted(EMBEDDERS))
def embedder(request: pytest.FixtureRequest) -> Embedder:
    return EMBEDDERS[request.param](request)
