"""The adapters one engine runs on, in one object the engine's modules share by reference.

`HierarchicalMemory` builds one `EngineParts` and hands it to the write unit of work, retrieval,
the outbox worker, maintenance and transfer, so replacing the embedder (as `bench/` does while
seeding) reaches every one of them at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import MemoryConfig
from .ports import Embedder, MemoryCache, MemoryStore, Outbox, TextIndex, VectorIndex

__all__ = ["EngineParts"]


@dataclass
class EngineParts:
    config: MemoryConfig
    store: MemoryStore
    vectors: VectorIndex
    text: TextIndex
    embedder: Embedder
    cache: MemoryCache | None = None
    # The queue of write-behind ops; shares the store's transactions (None: no write-behind).
    outbox: Outbox | None = None

    def invalidate(self, memory_id: str) -> None:
        """Drop a cached copy after its row changed."""
        if self.cache is not None:
            self.cache.invalidate(memory_id)
