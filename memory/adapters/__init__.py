"""Default adapters of the ports: SQLite rows and outbox, sqlite-vec vectors, FTS5 text, an LRU
cache."""

from .cache import LRUMemoryCache
from .fts5_index import FTS5TextIndex
from .sqlite_outbox import SQLiteOutbox
from .sqlite_store import SQLiteMemoryStore
from .sqlite_vec_index import SqliteVecIndex

__all__ = [
    "FTS5TextIndex", "LRUMemoryCache", "SQLiteMemoryStore", "SQLiteOutbox", "SqliteVecIndex",
]
