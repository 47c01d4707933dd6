"""Ops waiting in memory while even the outbox insert fails, and the storage health both the
request side and the worker report to.

`submit` normally returns once the outbox row is committed. When the database cannot take even
that insert (disk full, I/O error, a lock held past the busy timeout), the payload waits here,
oldest first, bounded by its number of ops, and the worker (or the next `submit`) writes
everything waiting, in order, once the database takes writes again. What waits here is lost if
the process dies before then: it is the last resort, and readiness says so while it holds
anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from .errors import StorageError
from .executors import Executors
from .ports import Outbox

log = logging.getLogger("headroom.writer")

__all__ = ["PendingOps", "StorageHealth"]


class StorageHealth:
    """Whether the database took the last write; logs once when it starts failing and once when
    it recovers, not per attempt."""

    def __init__(self) -> None:
        self.error: StorageError | None = None
        self.since: float | None = None
        self.failures = 0  # write attempts that failed on storage, over the process's life

    def failed(self, exc: StorageError) -> None:
        self.failures += 1
        if self.error is None:
            self.since = time.monotonic()
            log.warning("database writes failing (%s); ops stay queued and are retried: %s",
                        exc.reason, exc)
        self.error = exc

    def ok(self) -> None:
        if self.error is not None:
            down = time.monotonic() - (self.since or time.monotonic())
            log.info("database writes work again after %.1fs", down)
        self.error = None
        self.since = None


class PendingOps:
    def __init__(
        self, outbox: Outbox, executors: Executors, health: StorageHealth, max_ops: int
    ) -> None:
        self.outbox = outbox
        self.executors = executors
        self.health = health
        self.max_ops = max_ops
        self._items: deque[tuple[dict[str, Any], int]] = deque()
        self._ops = 0
        # One writer of the outbox from here at a time: two flushes of one snapshot would queue
        # its payloads twice.
        self._lock = asyncio.Lock()

    @property
    def ops(self) -> int:
        """Ops waiting in memory."""
        return self._ops

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, payload: dict[str, Any], n_ops: int) -> int | None:
        """Commit `payload` to the outbox behind everything waiting here; returns its outbox id.
        When storage fails, keep it here and return None; past `max_ops`, raise StorageError."""
        async with self._lock:
            try:
                ids = await self._write_all([payload])
            except StorageError as exc:
                self.health.failed(exc)
                if self._ops + n_ops > self.max_ops:
                    raise StorageError(
                        f"cannot queue {n_ops} memory ops: the database fails ({exc.reason}) and "
                        f"{self._ops} ops already wait in memory (memory_queue_max_ops="
                        f"{self.max_ops})", reason=exc.reason, path=exc.path,
                    ) from exc
                self._items.append((payload, n_ops))
                self._ops += n_ops
                return None
            self.health.ok()
            return ids[-1]

    async def flush(self) -> None:
        """Write everything waiting to the outbox, in order; raises StorageError if it cannot."""
        if not self._items:
            return
        async with self._lock:
            try:
                await self._write_all([])
            except StorageError as exc:
                self.health.failed(exc)
                raise
            self.health.ok()

    async def _write_all(self, extra: list[dict[str, Any]]) -> list[int]:
        """One transaction: the waiting payloads, then `extra`. Only after it commits do the
        written ones leave memory (the lock keeps anyone else from taking them meanwhile)."""
        waiting = [p for p, _ in self._items]
        payloads = waiting + extra
        if not payloads:
            return []
        outbox = self.outbox
        ids = await self.executors.write(lambda: [outbox.put(p) for p in payloads])
        if waiting:
            log.info("%d queued payloads (%d ops) moved from memory to the outbox",
                     len(waiting), self._ops)
        for _ in waiting:
            _, n = self._items.popleft()
            self._ops -= n
        return ids
