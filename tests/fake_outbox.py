"""An in-memory `Outbox` with the SQLite one's semantics, for the contract suite and fast tests.

Its `transaction()` stands in for the store's: everything done inside it is undone if the block
raises, which is what makes `complete` atomic with the apply in the real adapter.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from headroom.memory.ports import ClaimedRow, DeadLetter

__all__ = ["InMemoryOutbox"]


@dataclass
class _Row:
    payload: str  # JSON, as the real table keeps it: a caller cannot mutate a queued payload
    user_id: str
    created_at: datetime
    attempts: int = 0
    last_error: str | None = None
    owner: str | None = None
    lease_until: float | None = None


@dataclass
class _State:
    rows: dict[int, _Row] = field(default_factory=dict)
    dead: dict[int, DeadLetter] = field(default_factory=dict)
    next_id: int = 1
    next_dead_id: int = 1


class InMemoryOutbox:
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._state = _State()
        self._tx_depth = 0

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            if self._tx_depth:  # nested: join the outer one, as the SQLite store does
                yield
                return
            snapshot = copy.deepcopy(self._state)
            self._tx_depth = 1
            try:
                yield
            except BaseException:
                self._state = snapshot
                raise
            finally:
                self._tx_depth = 0

    def put(self, payload: dict[str, Any]) -> int:
        scope = payload.get("scope")
        user_id = str(scope.get("user_id", "")) if isinstance(scope, dict) else ""
        with self._lock:
            oid = self._state.next_id
            self._state.next_id += 1
            self._state.rows[oid] = _Row(json.dumps(payload), user_id, datetime.now(UTC))
            return oid

    def claim(self, limit: int, owner: str, lease_s: float) -> list[ClaimedRow]:
        now = self._clock()
        out: list[ClaimedRow] = []
        with self._lock:
            for oid in sorted(self._state.rows):
                if len(out) >= limit:
                    break
                row = self._state.rows[oid]
                if row.lease_until is None or row.lease_until <= now:
                    row.owner, row.lease_until = owner, now + lease_s
                    out.append((oid, json.loads(row.payload), row.attempts))
        return out

    def complete(self, outbox_id: int, owner: str) -> bool:
        with self._lock:
            row = self._state.rows.get(outbox_id)
            if row is None or row.owner != owner:
                return False
            del self._state.rows[outbox_id]
            return True

    def fail(
        self, outbox_id: int, owner: str, error: str, *, retry_after_s: float = 0.0
    ) -> bool:
        with self._lock:
            row = self._state.rows.get(outbox_id)
            if row is None or row.owner != owner:
                return False
            row.attempts += 1
            row.last_error = error
            row.owner = None
            row.lease_until = self._clock() + retry_after_s if retry_after_s > 0 else None
            return True

    def dead_letter(self, outbox_id: int, error: str) -> bool:
        with self._lock:
            row = self._state.rows.pop(outbox_id, None)
            if row is None:
                return False
            dead_id = self._state.next_dead_id
            self._state.next_dead_id += 1
            self._state.dead[dead_id] = DeadLetter(
                id=dead_id, outbox_id=outbox_id, user_id=row.user_id,
                payload=json.loads(row.payload), attempts=row.attempts + 1, error=error,
                created_at=row.created_at, dead_at=datetime.now(UTC),
            )
            return True

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        with self._lock:
            return [self._state.dead[i] for i in sorted(self._state.dead)[:limit]]

    def redrive(self, ids: Sequence[int] | None = None) -> int:
        with self._lock:
            chosen = sorted(self._state.dead) if ids is None else sorted(set(ids))
            moved = 0
            for dead_id in chosen:
                letter = self._state.dead.pop(dead_id, None)
                if letter is None:
                    continue
                oid = self._state.next_id
                self._state.next_id += 1
                self._state.rows[oid] = _Row(
                    json.dumps(letter.payload), letter.user_id, letter.created_at
                )
                moved += 1
            return moved

    def size(self) -> int:
        with self._lock:
            return len(self._state.rows)

    def dead_count(self) -> int:
        with self._lock:
            return len(self._state.dead)
