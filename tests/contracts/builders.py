"""Small builders the contract suites share: memories, hand-written vectors, indexed writes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from headroom.memory.models import Memory, MemoryCategory, scope_key
from tests.contracts.backends import DIMENSION, Storage

USER_KEY = scope_key(None, None, None)  # the index key of a user-level memory
T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def at(minutes: float) -> datetime:
    """A fixed clock: `minutes` after T0."""
    return T0 + timedelta(minutes=minutes)


def axis(i: int, scale: float = 1.0) -> np.ndarray:
    """The unit vector along dimension `i` (times `scale`)."""
    vector = np.zeros(DIMENSION, dtype=np.float32)
    vector[i] = scale
    return vector


def blend(*weights: float) -> np.ndarray:
    """A unit vector with these leading components."""
    vector = np.zeros(DIMENSION, dtype=np.float32)
    vector[: len(weights)] = weights
    return vector / np.linalg.norm(vector)


def memory(content: str = "a fact", user: str = "alice", **fields: Any) -> Memory:
    """A memory created at T0 unless `created_at` says otherwise (valid from its creation)."""
    created = fields.pop("created_at", T0)
    fields.setdefault("valid_from", created)
    return Memory(content=content, user_id=user, created_at=created, **fields)


def put(storage: Storage, mem: Memory, vector: np.ndarray | None = None) -> int:
    """Store `mem` and, while it is current, index it: what the engine does in one write."""
    vector = axis(0) if vector is None else vector
    mem.embedding = vector.tolist()
    with storage.store.transaction():
        rid = storage.store.insert(mem)
        if mem.is_current:
            storage.vectors.add(rid, mem.user_id, mem.scope.key, mem.category, vector)
            storage.text.add(rid, mem.user_id, mem.scope.key, mem.category, mem.content)
    mem.embedding = None
    return rid


def index_text(
    storage: Storage, rid: int, user: str, content: str, *, scope_key: str = USER_KEY,
    category: MemoryCategory = MemoryCategory.FACT,
) -> None:
    with storage.store.transaction():
        storage.text.add(rid, user, scope_key, category, content)


def index_vector(
    storage: Storage, rid: int, user: str, vector: np.ndarray, *, scope_key: str = USER_KEY,
    category: MemoryCategory = MemoryCategory.FACT,
) -> None:
    with storage.store.transaction():
        storage.vectors.add(rid, user, scope_key, category, vector)


def ids(memories: list[Memory]) -> list[str]:
    return [m.id for m in memories]


def run_in_threads(work: Callable[[int], None], n: int, timeout_s: float = 60.0) -> None:
    """Run `work(0)` ... `work(n - 1)` on n threads at once; fail if one is still running after
    `timeout_s`, and re-raise the first error a thread met."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"a thread is still running after {timeout_s}s"
    if errors:
        raise errors[0]
