"""Reads by id or by filter (no ranking): one memory through the cache, its history and audit
trail, filtered lists and counts. Ranked reads are `retrieval`'s."""

from __future__ import annotations

from typing import Any

from .errors import MemoryNotFoundError
from .executors import Executors
from .models import Memory, MemoryFilter
from .parts import EngineParts

__all__ = ["Reads"]


class Reads:
    def __init__(self, parts: EngineParts, executors: Executors) -> None:
        self.parts = parts
        self.executors = executors

    async def get(self, memory_id: str, user_id: str | None = None) -> Memory:
        """The memory with this id (current or not); with `user_id`, another user's is not
        found. Current memories are cached."""
        cache, store = self.parts.cache, self.parts.store
        memory = cache.get(memory_id) if cache is not None else None
        if memory is None:
            memory = await self.executors.read(lambda: store.get(memory_id))
            if memory is None:
                raise MemoryNotFoundError(memory_id)
            if cache is not None and memory.is_current:
                cache.put(memory)
        if user_id is not None and memory.user_id != user_id:
            raise MemoryNotFoundError(memory_id)
        return memory

    async def history(self, memory_id: str, user_id: str | None = None) -> list[Memory]:
        await self.get(memory_id, user_id)
        return await self.executors.read(lambda: self.parts.store.chain(memory_id))

    async def events(self, memory_id: str, user_id: str | None = None) -> list[dict[str, Any]]:
        await self.get(memory_id, user_id)
        return await self.executors.read(lambda: self.parts.store.events(memory_id))

    async def query(self, flt: MemoryFilter) -> list[Memory]:
        return await self.executors.read(lambda: self.parts.store.query(flt))

    async def count(self, flt: MemoryFilter) -> int:
        return await self.executors.read(lambda: self.parts.store.count(flt))
