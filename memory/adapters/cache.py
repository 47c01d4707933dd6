"""The LRU `MemoryCache`: hot memories by id. Thread-safe, since readers run on a pool."""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict

from ..models import Memory

__all__ = ["LRUMemoryCache"]


class LRUMemoryCache:
    def __init__(self, max_size: int = 1000) -> None:
        self.max_size = max_size
        self._items: OrderedDict[str, Memory] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, memory_id: str) -> Memory | None:
        with self._lock:
            memory = self._items.get(memory_id)
            if memory is None:
                self.misses += 1
                return None
            self._items.move_to_end(memory_id)
            self.hits += 1
            # A deep copy, so a caller mutating its result (metadata, entity_refs) cannot change
            # what others read.
            return copy.deepcopy(memory)

    def put(self, memory: Memory) -> None:
        if self.max_size <= 0:
            return
        with self._lock:
            self._items[memory.id] = copy.deepcopy(memory)
            self._items.move_to_end(memory.id)
            while len(self._items) > self.max_size:
                self._items.popitem(last=False)

    def invalidate(self, memory_id: str) -> None:
        with self._lock:
            self._items.pop(memory_id, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
