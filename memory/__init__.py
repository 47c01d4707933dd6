"""The Headroom memory engine: hierarchical, temporal memory on SQLite + sqlite-vec + FTS5."""

from memory.errors import (
    ConfigError,
    EmbedderError,
    HeadroomMemoryError,
    ImportFormatError,
    MemoryNotFoundError,
    StorageError,
    SupersededError,
    ValidationError,
)
from memory.hierarchical import HierarchicalMemory, MemoryDraft
from memory.models import (
    EmbedderBackend,
    Memory,
    MemoryCategory,
    MemoryConfig,
    MemoryFilter,
    MemoryOps,
    Scope,
    ScopeLevel,
    SearchResult,
    VectorFilter,
)

__all__ = [
    "ConfigError",
    "EmbedderBackend",
    "EmbedderError",
    "HeadroomMemoryError",
    "HierarchicalMemory",
    "ImportFormatError",
    "Memory",
    "MemoryCategory",
    "MemoryConfig",
    "MemoryDraft",
    "MemoryFilter",
    "MemoryNotFoundError",
    "MemoryOps",
    "Scope",
    "ScopeLevel",
    "SearchResult",
    "StorageError",
    "SupersededError",
    "ValidationError",
    "VectorFilter",
]
