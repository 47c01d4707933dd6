"""The outbox's face to the engine's callers: durable submit, the worker's lifecycle, health,
and the dead letters.

`submit` returns once the outbox row is committed, so a caller that waits for it (the proxy,
before the answer's last byte) knows the ops survive a crash. If even that insert fails on
storage, the ops wait in memory (`pending_ops`) and `submit` still returns; past the bound it
raises `StorageError`. `health` says *degraded*, with reasons, while storage fails, ops wait in
memory, or the embedder fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .errors import ConfigError
from .executors import Executors
from .models import MemoryOps, Scope
from .outbox_payload import encode_payload, op_count
from .parts import EngineParts
from .pending_ops import PendingOps, StorageHealth
from .ports import Outbox
from .unit_of_work import UnitOfWork
from .writer import OutboxWorker

__all__ = ["WriteBehind"]

_HEALTH_READ_TIMEOUT_S = 2.0


class WriteBehind:
    def __init__(
        self, parts: EngineParts, executors: Executors, unit: UnitOfWork,
        outbox: Outbox | None, after_write: Callable[[Iterable[str]], None],
    ) -> None:
        self.parts = parts
        self.executors = executors
        self.unit = unit
        self._outbox = outbox
        self.after_write = after_write
        self.health_state = StorageHealth()
        self._pending = (
            PendingOps(outbox, executors, self.health_state, parts.config.memory_queue_max_ops)
            if outbox is not None else None
        )
        self.worker: OutboxWorker | None = None

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            raise ConfigError("this engine has no outbox: pass outbox= to HierarchicalMemory")
        return self._outbox

    @property
    def pending(self) -> PendingOps:
        if self._pending is None:
            raise ConfigError("this engine has no outbox: pass outbox= to HierarchicalMemory")
        return self._pending

    @property
    def queued_in_memory(self) -> int:
        return self._pending.ops if self._pending is not None else 0

    async def start(self) -> None:
        if self.worker is None:
            self.worker = OutboxWorker(
                self.parts, self.executors, self.unit, self.outbox, self.pending,
                self.health_state, self.after_write,
            )
            await self.worker.start()

    async def submit(self, ops: MemoryOps, scope: Scope, request_id: str | None) -> int | None:
        """Queue the ops durably; the outbox id, or None when they wait in memory."""
        outbox_id = await self.pending.put(encode_payload(ops, scope, request_id), op_count(ops))
        if self.worker is not None:
            self.worker.wake()
        return outbox_id

    async def drain(self, timeout: float | None) -> None:
        if self.worker is not None:
            await self.worker.drain(timeout)

    async def stop(self, timeout: float) -> None:
        if self.worker is not None:
            await self.worker.stop(timeout)

    def stats(self) -> dict[str, int]:
        """The worker's counters, and what waits in memory."""
        worker = self.worker
        c = worker.counters if worker is not None else None
        return {
            "applied": c.applied if c else 0,
            "dropped": c.dropped if c else 0,
            "retries": c.retries if c else 0,
            "skipped_limit": c.skipped_limit if c else 0,
            "row_failures": c.row_failures if c else 0,
            "dead_lettered": c.dead_lettered if c else 0,
            "lost_claims": c.lost_claims if c else 0,
            "dead_letters": worker.dead_letters if worker is not None else 0,
            "queued_in_memory": self.queued_in_memory,
            "storage_failures": self.health_state.failures,
        }

    async def counts(self) -> tuple[int, int]:
        """(rows queued in the outbox, dead letters), read now."""
        outbox = self.outbox
        return await self.executors.read(lambda: (outbox.size(), outbox.dead_count()))

    async def health(self) -> dict[str, Any]:
        reasons: list[str] = []
        error = self.health_state.error
        if error is not None:
            reasons.append(f"storage failing ({error.reason}): {error}")
        queued = self.queued_in_memory
        if queued:
            reasons.append(f"{queued} memory ops wait in memory for the outbox")
        worker = self.worker
        if worker is not None and worker.embedder_error is not None:
            reasons.append(f"embedder failing, queued ops wait: {worker.embedder_error}")
        pending: int | None = None
        dead: int | None = None
        try:
            pending, dead = await asyncio.wait_for(self.counts(), _HEALTH_READ_TIMEOUT_S)
        except TimeoutError:
            reasons.append(f"outbox unreadable within {_HEALTH_READ_TIMEOUT_S:.0f}s")
        except Exception as exc:
            reasons.append(f"outbox unreadable: {type(exc).__name__}: {exc}")
        return {
            "status": "degraded" if reasons else "ok",
            "reasons": reasons,
            "outbox_pending": pending,
            "dead_letters": dead,
            "queued_in_memory": queued,
        }

    async def dead_letters(self, limit: int) -> list[dict[str, Any]]:
        outbox = self.outbox
        letters = await self.executors.read(lambda: outbox.dead_letters(limit))
        return [
            {"id": d.id, "outbox_id": d.outbox_id, "user_id": d.user_id, "payload": d.payload,
             "attempts": d.attempts, "error": d.error, "created_at": d.created_at.isoformat(),
             "dead_at": d.dead_at.isoformat()}
            for d in letters
        ]

    async def redrive(self, ids: Sequence[int] | None) -> int:
        outbox = self.outbox
        moved = await self.executors.write(lambda: outbox.redrive(ids))
        if moved and self.worker is not None:
            self.worker.wake()
        return moved
