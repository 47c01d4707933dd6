"""Maintenance: hard deletes for privacy requests, statistics, and index upkeep."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from .common_words import CommonWords
from .executors import Executors
from .models import MemoryFilter, is_database_url
from .parts import EngineParts

log = logging.getLogger("headroom.memory")

__all__ = ["Maintenance"]


class Maintenance:
    def __init__(
        self, parts: EngineParts, executors: Executors, common_words: CommonWords
    ) -> None:
        self.parts = parts
        self.executors = executors
        self.common_words = common_words

    async def purge(self, flt: MemoryFilter) -> dict[str, int]:
        """Delete every row, vector, FTS entry, cached copy, audit event and outbox entry `flt`
        selects (`all_scopes` semantics), then leave no older copy in the WAL."""
        p = self.parts
        user_id = flt.scope.user_id

        def run() -> dict[str, int]:
            vectors_before = p.vectors.count(user_id)
            text_before = p.text.count(user_id)
            rids, counts = p.store.purge(flt)
            p.vectors.remove(rids)
            p.text.remove(rids)
            counts["vectors"] = vectors_before - p.vectors.count(user_id)
            counts["fts"] = text_before - p.text.count(user_id)
            return counts

        counts = await self.executors.write(run)
        await self.executors.on_writer(p.store.checkpoint)
        self.common_words.forget(user_id)  # they are words of the purged memories
        if p.cache is not None:
            counts["cache"] = len(p.cache)
            p.cache.clear()
            counts["cache"] -= len(p.cache)
        return counts

    async def clear(self, user_id: str | None = None) -> dict[str, int]:
        """Purge one user, or with no user every user in the database."""
        if user_id is not None:
            return await self.purge(MemoryFilter(user_id=user_id, all_scopes=True))
        users = await self.executors.read(lambda: list(self.parts.store.stats()["users"]))
        total: dict[str, int] = {}
        for uid in users:
            counts = await self.purge(MemoryFilter(user_id=uid, all_scopes=True))
            for key, value in counts.items():
                total[key] = total.get(key, 0) + value
        return total

    async def stats(self, user_id: str | None = None) -> dict[str, Any]:
        p = self.parts

        def run() -> dict[str, Any]:
            out = p.store.stats(user_id)
            out["vectors"] = p.vectors.count(user_id)
            out["fts_rows"] = p.text.count(user_id)
            if p.outbox is not None:
                out["dead_letters"] = p.outbox.dead_count()
            return out

        out = await self.executors.read(run)
        out["cache_size"] = len(p.cache) if p.cache is not None else 0
        out["embedding_model"] = p.embedder.model_id
        path = str(p.config.db_path)
        if is_database_url(path):
            # The server's store reports the database's size itself (stats' db_bytes); the
            # password never leaves in the stats.
            from .adapters.postgres import redact_url

            out["db_path"] = redact_url(path)
        else:
            out["db_path"] = path
            out["db_bytes"] = sum(
                os.path.getsize(f) for f in (path, path + "-wal") if os.path.exists(f)
            )
        return out

    async def optimize(self) -> None:
        """Merge the full-text index's segments (after bulk writes; the server runs it in the
        background at start)."""
        started = time.perf_counter()
        await self.executors.write(self.parts.text.optimize)
        log.info("full-text index optimized in %.1fs", time.perf_counter() - started)
