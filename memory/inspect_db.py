"""What a database file records about itself, read without loading an embedding model.

Commands that never embed (list, show, stats, purge, the outbox commands) still have to open the
engine on the embedder a file was built with, or the engine refuses the file. This module reads the
model id and vector dimension the store's settings record and hands back a stand-in embedder that
carries them and refuses to embed, so such commands start fast whatever model built the file.

Reading goes through the store adapter, so opening a file of an older schema brings it up to date
exactly as any other open would; nothing else is written, and a missing file is never created.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, EmbedderError, StorageError
from .hierarchical import HierarchicalMemory
from .models import MemoryConfig, is_database_url

__all__ = [
    "RecordedEmbedder", "RecordedModel", "display_name", "open_without_model", "recorded_model",
]

_MODEL_KEY = "embedding_model"
_DIMENSION_KEY = "vector_dimension"


@dataclass(frozen=True)
class RecordedModel:
    """The embedder a database was built with: its id (`backend:model`) and vector size."""

    model_id: str
    dimension: int


class RecordedEmbedder:
    """An `Embedder` that only carries a recorded model id and dimension; `embed` fails."""

    def __init__(self, recorded: RecordedModel) -> None:
        self.model_id = recorded.model_id
        self._dimension = recorded.dimension

    @property
    def dimension(self) -> int:
        return self._dimension

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        raise EmbedderError("this database was opened without an embedding model")


def display_name(target: str | Path) -> str:
    """The database as messages show it: a file's path, or a URL without its password."""
    if not is_database_url(target):
        return str(target)
    from .adapters.postgres import redact_url

    return redact_url(str(target))


def recorded_model(path: str | Path) -> RecordedModel | None:
    """The model `path` was built with, or None for a file no memory was ever written to.
    Raises StorageError when there is no file at `path` (it is not created). A postgresql://
    URL is read through the PostgreSQL store (StorageError when the server cannot be reached)."""
    if is_database_url(path):
        model, dimension = _read_postgres_settings(str(path))
    else:
        model, dimension = _read_sqlite_settings(path)
    if not model or not dimension:
        return None
    return RecordedModel(model, int(dimension))


def _read_sqlite_settings(path: str | Path) -> tuple[str | None, str | None]:
    from .adapters import SQLiteMemoryStore
    from .db import Database

    if not Path(path).exists():
        raise StorageError(f"no database at {path}")
    database = Database(path)
    try:
        store = SQLiteMemoryStore(database)
        return store.get_setting(_MODEL_KEY), store.get_setting(_DIMENSION_KEY)
    finally:
        database.close()


def _read_postgres_settings(url: str) -> tuple[str | None, str | None]:
    try:
        from .adapters.postgres import PostgresMemoryStore, open_database
    except ImportError as exc:
        raise ConfigError(
            "a postgresql:// database needs the postgres extra: "
            "pip install 'headroom-memory[postgres]'"
        ) from exc
    database = open_database(url, pool_size=1)
    try:
        store = PostgresMemoryStore(database)
        return store.get_setting(_MODEL_KEY), store.get_setting(_DIMENSION_KEY)
    finally:
        database.close()


async def open_without_model(path: str | Path) -> HierarchicalMemory:
    """The engine on an existing file, wired to the model it records (nothing loads). A file
    without a recorded model opens with the configured default, which loads only if asked to embed.
    Runs the file reads on a worker thread; the caller closes the engine."""
    recorded = await asyncio.to_thread(recorded_model, path)
    embedder = RecordedEmbedder(recorded) if recorded is not None else None
    return await HierarchicalMemory.create(MemoryConfig(db_path=path), embedder=embedder)
