"""The Headroom memory engine: hierarchical, temporal memory on SQLite + sqlite-vec + FTS5."""

from .errors import (
    ConfigError,
    EmbedderError,
    HeadroomMemoryError,
    ImportFormatError,
    LimitExceededError,
    MemoryNotFoundError,
    StorageError,
    SupersededError,
    ValidationError,
)
from .hierarchical import HierarchicalMemory
from .models import (
    EmbedderBackend,
    Memory,
    MemoryCategory,
    MemoryConfig,
    MemoryDraft,
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
    "LimitExceededError",
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
