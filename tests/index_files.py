"""Helpers for the SQLite index tests: unit vectors and an index file with its tables made."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headroom.memory.adapters import SQLiteMemoryStore, SqliteVecIndex
from headroom.memory.db import Database

__all__ = ["index_file", "unit"]


def unit(x: np.ndarray) -> np.ndarray:
    """Rows (or one vector) scaled to length 1, as float32: what the indexes store."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def index_file(path: Path, dimension: int) -> Path:
    """A closed SQLite file at `path` with the store's and the vector index's tables, so that
    several connections (or processes) can open it as peers."""
    db = Database(path)
    SQLiteMemoryStore(db)
    SqliteVecIndex(db, dimension)
    db.close()
    return path
