"""The outbox worker: applies queued `<memory>` ops off the request path, exactly once.

A request writes its ops to the `outbox` table (one insert, durable). This worker takes pending
rows in order, embeds their texts in one batch, and applies each row's ops *and deletes the row in
the same transaction*, so a crash either leaves the row (replayed on the next start) or has applied
it completely. Ops that are invalid (a memory already superseded, an unknown id) are logged and
dropped; a failing embedder leaves rows queued and is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from .errors import HeadroomMemoryError
from .executors import Executors
from .models import AddOp, Memory, MemoryDraft, MemoryOps, Scope, utcnow
from .parts import EngineParts
from .unit_of_work import UnitOfWork

log = logging.getLogger("headroom.writer")

__all__ = ["OutboxWorker"]

_BATCH = 32
_MAX_BACKOFF = 30.0


class OutboxWorker:
    def __init__(
        self, parts: EngineParts, executors: Executors, unit: UnitOfWork,
        after_write: Callable[[Iterable[str]], None],
    ) -> None:
        self.parts = parts
        self.executors = executors
        self.unit = unit
        self.after_write = after_write
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # Bumped by every wake(): a pass that began before the latest wake cannot declare idle,
        # because the row that wake announced may have been committed after the pass looked.
        self._requested = 0
        self.applied = 0
        self.failed = 0  # ops dropped as invalid
        self.retries = 0  # batches that failed (e.g. embedder down) and stay queued

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="headroom-outbox")
        self.wake()  # replay whatever a previous process left behind

    def wake(self) -> None:
        self._requested += 1
        self._idle.clear()
        self._wake.set()

    async def drain(self, timeout: float | None = None) -> None:
        self.wake()
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def stop(self, timeout: float = 30.0) -> None:
        """Drain what is queued, then stop. Rows not applied in time stay for the next start."""
        if self._task is None:
            return
        try:
            await self.drain(timeout)
        except TimeoutError:
            log.warning("outbox not drained within %.0fs; the rest replays on next start", timeout)
        self._stopping = True
        self._wake.set()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        backoff = 0.5
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            seen = self._requested
            try:
                while await self._process_batch():
                    pass
                backoff = 0.5
                if seen == self._requested:
                    self._idle.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.retries += 1
                log.exception("outbox batch failed; retrying in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                self._wake.set()

    async def _process_batch(self) -> bool:
        """Apply up to one batch of rows; False when the outbox is empty."""
        store = self.parts.store
        rows = await self.executors.read(lambda: store.outbox_pending(_BATCH))
        if not rows:
            return False
        texts: list[str] = []
        for _, payload in rows:
            ops = MemoryOps.from_dict(payload["ops"])
            texts += [a.text for a in ops.add] + [u.text for u in ops.update]
        vectors = await self.executors.embed(texts) if texts else []
        cursor = 0
        for outbox_id, payload in rows:
            ops = MemoryOps.from_dict(payload["ops"])
            n = len(ops.add) + len(ops.update)
            batch_vectors = list(vectors[cursor : cursor + n])
            cursor += n
            await self.executors.write(
                lambda p=payload, o=ops, v=batch_vectors, i=outbox_id: self._apply(i, p, o, v)
            )
        self.after_write(payload["scope"]["user_id"] for _, payload in rows)
        return True

    def _apply(
        self, outbox_id: int, payload: dict[str, Any], ops: MemoryOps, vectors: list
    ) -> None:
        """Runs in one writer transaction: the ops and the outbox row's deletion commit together."""
        s = payload["scope"]
        scope = Scope(s["user_id"], s.get("session_id"), s.get("agent_id"), s.get("turn_id"))
        request_id = payload.get("request_id")
        vec = iter(vectors)
        for add in ops.add:
            vector = next(vec)
            try:  # building the draft validates it: a bad op is dropped, never retried forever
                memory = self._draft_memory(add, scope.clamp(add.scope))
                self.unit.insert_or_reinforce(memory, vector, dedup=True, request_id=request_id)
                self.applied += 1
            except HeadroomMemoryError as exc:
                self.failed += 1
                log.warning("dropped an add op of request %s: %s", request_id, exc)
        for update in ops.update:
            vector = next(vec)
            try:
                self.unit.supersede(
                    update.id, update.text, vector, utcnow(), update.category, update.importance,
                    None, None, scope.user_id, request_id,
                )
                self.applied += 1
            except HeadroomMemoryError as exc:
                self.failed += 1
                log.warning("dropped an update op of request %s: %s", request_id, exc)
        for forget in ops.forget:
            try:
                self.unit.forget(forget.id, scope.user_id, "forgotten by the model", request_id)
                self.applied += 1
            except HeadroomMemoryError as exc:
                self.failed += 1
                log.warning("dropped a forget op of request %s: %s", request_id, exc)
        self.parts.store.outbox_done([outbox_id])

    def _draft_memory(self, add: AddOp, scope: Scope) -> Memory:
        return MemoryDraft(
            add.text, scope.user_id, scope.session_id, scope.agent_id, scope.turn_id,
            add.category, add.importance, list(add.entity_refs),
            {"source": "conversation"},
        ).build(self.parts.embedder.model_id)
