"""The outbox worker: applies queued `<memory>` ops off the request path, exactly once, whatever
the number of processes on the file.

Two processes on one SQLite file work safely; this is the design, not a refusal. Each worker has
an owner id (host, pid, random suffix) and takes rows through `Outbox.claim`, which leases them to
it atomically (one UPDATE in BEGIN IMMEDIATE), so no two workers hold a row at once. It embeds
the claimed rows' texts outside any transaction, then applies each row in ONE write transaction
that first re-checks the claim: `Outbox.complete` deletes the row only if this worker still owns
it (a lease that ran out may have been taken over), and if it does not, the transaction rolls
back with nothing applied. A row is therefore applied and removed together, by one worker, once;
a crash before the commit leaves the row to be replayed, and a forgotten or superseded memory
never comes back from a second apply of the op that first wrote it.

Failures are sorted by whose fault they are:
- A row's own fault (its payload does not decode, its text fails to embed while a probe text
  embeds fine, its apply raises) is recorded on the row (`Outbox.fail`: attempts, last error,
  a growing delay) and the worker moves on; after `MemoryConfig.outbox_max_attempts` the row is
  parked as a dead letter with its error, never holding back other rows.
- The embedder being down (the probe fails too) or the database failing (`StorageError`: disk
  full, I/O error, locked) is nobody's row fault: rows stay queued and claimed, no attempt is
  counted, the worker backs off (up to 30 s for the embedder, 5 s for storage) and retries until
  it works again. Nothing is dropped after N retries.
- An op the engine refuses (a memory already superseded, another user's id, over an operator
  limit) is dropped (or counted as `skipped_limit`) and logged; the rest of its block applies.

Leases last `_LEASE_S`; a worker that dies holding rows releases them when the lease runs out,
and another worker (in any process) picks them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .errors import HeadroomMemoryError, LimitExceededError, StorageError
from .executors import Executors
from .models import AddOp, Memory, MemoryDraft, utcnow
from .outbox_payload import OutboxPayload, decode_payload
from .parts import EngineParts
from .pending_ops import PendingOps, StorageHealth
from .ports import ClaimedRow, Outbox
from .unit_of_work import UnitOfWork

log = logging.getLogger("headroom.writer")

__all__ = ["OutboxWorker", "WorkerCounters"]

_BATCH = 32
# Long enough for one batch's embedding and apply; short, so rows a killed process had claimed
# come back soon. A lease that runs out mid-batch costs only work: `complete` then fails for the
# rows another worker took over, and this worker rolls them back.
_LEASE_S = 10.0
_IDLE_POLL_S = 2.0  # look for rows other processes queued or left behind
_BUSY_POLL_S = 0.2  # rows wait for a retry delay or another owner's lease
_STORAGE_BACKOFF_MAX_S = 5.0
_EMBEDDER_BACKOFF_MAX_S = 30.0
_PROBE_TEXT = "headroom outbox probe"
_ERROR_CHARS = 2000


class _EmbedderDown(Exception):
    """The embedder fails for a probe text too: not the rows' fault."""


class _ClaimLost(Exception):
    """Another worker took the row over after our lease ran out: it applies it, not us."""


@dataclass
class WorkerCounters:
    applied: int = 0  # ops applied
    dropped: int = 0  # ops refused as invalid (superseded, unknown id, another user's)
    skipped_limit: int = 0  # adds over an operator limit
    retries: int = 0  # passes that failed on the embedder or storage and were retried
    row_failures: int = 0  # attempts that failed on one row's own fault
    dead_lettered: int = 0  # rows parked as dead letters by this worker
    lost_claims: int = 0  # rows another worker took over (their lease ran out)


class OutboxWorker:
    def __init__(
        self, parts: EngineParts, executors: Executors, unit: UnitOfWork, outbox: Outbox,
        pending: PendingOps, health: StorageHealth,
        after_write: Callable[[Iterable[str]], None],
    ) -> None:
        self.parts = parts
        self.executors = executors
        self.unit = unit
        self.outbox = outbox
        self.pending = pending
        self.health = health
        self.after_write = after_write
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.counters = WorkerCounters()
        self.embedder_error: str | None = None  # set while the embedder fails the probe
        self.dead_letters = 0  # as last read
        self._held: dict[int, ClaimedRow] = {}  # claimed, not yet applied or released
        self._embedder_ok = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # Bumped by every wake(): a pass that began before the latest wake cannot declare idle,
        # because the row that wake announced may have been committed after the pass looked.
        self._requested = 0

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="headroom-outbox")
        self.wake()  # replay whatever a previous process left behind

    def wake(self) -> None:
        self._requested += 1
        self._idle.clear()
        self._wake.set()

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the outbox is empty (dead letters aside) and nothing waits in memory."""
        self.wake()
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def stop(self, timeout: float = 30.0) -> None:
        """Drain what is queued, then stop. Rows not applied in time stay for the next start
        (rows this worker had claimed come back when their lease runs out)."""
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

    # --- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.0
        wait = 0.0
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait or None)
            self._wake.clear()
            seen = self._requested
            try:
                empty = await self._pass()
            except asyncio.CancelledError:
                raise
            except StorageError as exc:
                self.health.failed(exc)
                backoff = _next_backoff(backoff, 0.1, _STORAGE_BACKOFF_MAX_S)
            except _EmbedderDown as exc:
                if self.embedder_error is None:
                    log.warning("embedder failing; queued ops wait for it: %s", exc)
                self.embedder_error = str(exc)
                self._embedder_ok = False
                backoff = _next_backoff(backoff, 0.5, _EMBEDDER_BACKOFF_MAX_S)
            except Exception:
                log.exception("outbox pass failed; retrying")
                backoff = _next_backoff(backoff, 0.5, _EMBEDDER_BACKOFF_MAX_S)
            else:
                self.health.ok()
                backoff = 0.0
                if empty and seen == self._requested:
                    self._idle.set()
                wait = _IDLE_POLL_S if empty else _BUSY_POLL_S
                continue
            self.counters.retries += 1
            await asyncio.sleep(backoff)
            wait = 0.0
            self._wake.set()

    async def _pass(self) -> bool:
        """Apply every row this worker can claim now; True when nothing is queued anywhere
        (dead letters aside)."""
        await self.pending.flush()
        while True:
            if not self._held:
                queued = await self._read_counts()
                if not queued:
                    return not self.pending.ops
                await self._probe_embedder()
                rows = await self.executors.on_writer(
                    lambda: self.outbox.claim(_BATCH, self.owner, _LEASE_S)
                )
                if not rows:  # leased by other workers, or waiting out a retry delay
                    return False
                self._held = {row[0]: row for row in rows}
            else:
                await self._probe_embedder()
            await self._process(sorted(self._held.values()))

    async def _read_counts(self) -> int:
        """Rows queued in the outbox; refreshes the dead-letter count `writer_stats` shows."""
        outbox = self.outbox
        queued, self.dead_letters = await self.executors.read(
            lambda: (outbox.size(), outbox.dead_count())
        )
        return queued

    async def _probe_embedder(self) -> None:
        """Before claiming (and after the embedder failed): does it embed a known-good text? A
        model still loading is waited for here, before any lease starts running."""
        if self._embedder_ok:
            return
        try:
            await self.executors.embed([_PROBE_TEXT])
        except Exception as exc:
            raise _EmbedderDown(f"{type(exc).__name__}: {exc}") from exc
        if self.embedder_error is not None:
            log.info("embedder works again; applying queued ops")
        self.embedder_error = None
        self._embedder_ok = True

    # --- one batch of claimed rows ---------------------------------------------------------------

    async def _process(self, rows: list[ClaimedRow]) -> None:
        decoded: list[tuple[ClaimedRow, OutboxPayload]] = []
        for row in rows:
            try:
                decoded.append((row, decode_payload(row[1])))
            except Exception as exc:
                await self._row_failed(row, exc)
        vectors = await self._embed(decoded)
        users: set[str] = set()
        for row, payload in decoded:
            if row[0] not in vectors:
                continue  # its text failed to embed: recorded on the row already
            try:
                outcomes = await self.executors.write(
                    lambda r=row, p=payload, v=vectors[row[0]]: self._apply(r, p, v)
                )
            except StorageError:
                raise  # the database, not the row: the row stays claimed and is retried
            except _ClaimLost:
                self.counters.lost_claims += 1
                log.info("outbox row %d was taken over by another worker", row[0])
                self._held.pop(row[0], None)
                continue
            except Exception as exc:
                await self._row_failed(row, exc)
                continue
            self._held.pop(row[0], None)
            self._count(outcomes)
            users.add(payload.scope.user_id)
        if users:
            self.after_write(users)

    async def _embed(
        self, decoded: list[tuple[ClaimedRow, OutboxPayload]]
    ) -> dict[int, list[np.ndarray]]:
        """Each row's vectors (adds, then updates). One call for the batch; when it fails, one
        call per row, and a row whose own call fails is a row fault if the probe still embeds
        (else the embedder is down and nothing is counted against the rows)."""
        texts = [t for _, p in decoded for t in p.texts]
        try:
            flat = list(await self.executors.embed(texts)) if texts else []
        except Exception as batch_exc:
            return await self._embed_one_by_one(decoded, batch_exc)
        out: dict[int, list[np.ndarray]] = {}
        cursor = 0
        for row, payload in decoded:
            n = len(payload.texts)
            out[row[0]] = flat[cursor : cursor + n]
            cursor += n
        return out

    async def _embed_one_by_one(
        self, decoded: list[tuple[ClaimedRow, OutboxPayload]], batch_exc: Exception
    ) -> dict[int, list[np.ndarray]]:
        out: dict[int, list[np.ndarray]] = {}
        failed: list[tuple[ClaimedRow, Exception]] = []
        for row, payload in decoded:
            try:
                texts = payload.texts
                out[row[0]] = list(await self.executors.embed(texts)) if texts else []
            except Exception as exc:
                failed.append((row, exc))
        if failed:
            self._embedder_ok = False
            try:
                await self._probe_embedder()
            except _EmbedderDown:
                raise _EmbedderDown(f"{type(batch_exc).__name__}: {batch_exc}") from batch_exc
            for row, exc in failed:
                await self._row_failed(row, exc)
        return out

    def _apply(
        self, row: ClaimedRow, payload: OutboxPayload, vectors: list[np.ndarray]
    ) -> Counter[str]:
        """Runs in one writer transaction: the claim check, the ops and the row's deletion
        commit together. Returns what happened to each op (counted once committed)."""
        outbox_id = row[0]
        if not self.outbox.complete(outbox_id, self.owner):
            raise _ClaimLost(outbox_id)
        outcomes: Counter[str] = Counter()
        scope, request_id, ops = payload.scope, payload.request_id, payload.ops
        vec = iter(vectors)
        for add in ops.add:
            vector = next(vec)
            with _outcome(outcomes, "an add", request_id):
                memory = self._draft_memory(add, payload)  # validates: a bad op is dropped
                self.unit.insert_or_reinforce(memory, vector, dedup=True, request_id=request_id)
        for update in ops.update:
            vector = next(vec)
            with _outcome(outcomes, "an update", request_id):
                self.unit.supersede(
                    update.id, update.text, vector, utcnow(), update.category, update.importance,
                    None, None, scope.user_id, request_id,
                )
        for forget in ops.forget:
            with _outcome(outcomes, "a forget", request_id):
                self.unit.forget(forget.id, scope.user_id, "forgotten by the model", request_id)
        return outcomes

    def _draft_memory(self, add: AddOp, payload: OutboxPayload) -> Memory:
        scope = payload.scope.clamp(add.scope)
        return MemoryDraft(
            add.text, scope.user_id, scope.session_id, scope.agent_id, scope.turn_id,
            add.category, add.importance, list(add.entity_refs),
            {"source": "conversation"},
        ).build(self.parts.embedder.model_id)

    def _count(self, outcomes: Counter[str]) -> None:
        self.counters.applied += outcomes["applied"]
        self.counters.dropped += outcomes["dropped"]
        self.counters.skipped_limit += outcomes["skipped_limit"]

    async def _row_failed(self, row: ClaimedRow, exc: Exception) -> None:
        """Record a failure of this row alone: retried later with a growing delay, parked as a
        dead letter after `outbox_max_attempts`."""
        outbox_id, _, attempts = row
        error = f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
        attempts += 1
        self.counters.row_failures += 1
        if attempts >= self.parts.config.outbox_max_attempts:
            await self.executors.write(lambda: self.outbox.dead_letter(outbox_id, error))
            self.counters.dead_lettered += 1
            log.error("outbox row %d parked as a dead letter after %d attempts: %s",
                      outbox_id, attempts, error)
        else:
            delay = min(0.2 * 2 ** (attempts - 1), 30.0)
            await self.executors.write(
                lambda: self.outbox.fail(outbox_id, self.owner, error, retry_after_s=delay)
            )
            log.warning("outbox row %d failed (attempt %d of %d), retried in %.1fs: %s",
                        outbox_id, attempts, self.parts.config.outbox_max_attempts, delay, error)
        self._held.pop(outbox_id, None)


@contextlib.contextmanager
def _outcome(outcomes: Counter[str], what: str, request_id: str | None) -> Iterator[None]:
    """Count one op as applied, dropped (refused by the engine: never retried forever) or
    skipped over a limit. Anything else is the row's fault and propagates (rolling it back)."""
    try:
        yield
    except StorageError:
        raise  # SQLite may have rolled the transaction back already: stop here
    except LimitExceededError as exc:
        outcomes["skipped_limit"] += 1
        log.warning("skipped %s op of request %s: %s", what, request_id, exc)
    except HeadroomMemoryError as exc:
        outcomes["dropped"] += 1
        log.warning("dropped %s op of request %s: %s", what, request_id, exc)
    else:
        outcomes["applied"] += 1


def _next_backoff(current: float, first: float, cap: float) -> float:
    return min(current * 2, cap) if current else first
