"""Default adapters of the ports: SQLite rows, sqlite-vec vectors, FTS5 text, an LRU cache."""

from memory.adapters.cache import LRUMemoryCache
from memory.adapters.fts5_index import FTS5TextIndex
from memory.adapters.sqlite_store import SQLiteMemoryStore
from memory.adapters.sqlite_vec_index import SqliteVecIndex

__all__ = ["FTS5TextIndex", "LRUMemoryCache", "SQLiteMemoryStore", "SqliteVecIndex"]
