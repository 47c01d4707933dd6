"""Per-key rate limits: a token bucket per key and kind (requests, new memories), in memory, per
process, with an injectable clock; and `admit_new_memories`, the store-time check of the new
memories a block asks for (adds and updates; forgets are always let through)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..memory.models import MemoryOps
from .scope import Principal, current_principal

log = logging.getLogger(__name__)

__all__ = ["RateLimiter", "admit_new_memories"]


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """`take(key, kind, per_minute)` spends one token of a bucket holding `per_minute` tokens
    that refills continuously over a minute; False when empty. A limit of None is no limit."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def _refilled(self, key: str, kind: str, per_minute: int) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get((key, kind))
        if bucket is None:
            bucket = self._buckets[(key, kind)] = _Bucket(float(per_minute), now)
        bucket.tokens = min(
            float(per_minute), bucket.tokens + (now - bucket.updated) * per_minute / 60.0
        )
        bucket.updated = now
        return bucket

    def take(self, key: str, kind: str, per_minute: int | None, amount: int = 1) -> bool:
        if per_minute is None:
            return True
        bucket = self._refilled(key, kind, per_minute)
        if bucket.tokens < amount:
            return False
        bucket.tokens -= amount
        return True

    def has(self, key: str, kind: str, per_minute: int | None) -> bool:
        """Whether one token is there, without spending it."""
        return per_minute is None or self._refilled(key, kind, per_minute).tokens >= 1

    def retry_after(self, key: str, kind: str, per_minute: int | None) -> int:
        """Whole seconds until one token is back (for Retry-After)."""
        bucket = self._buckets.get((key, kind))
        if per_minute is None or per_minute <= 0 or bucket is None:
            return 60
        missing = max(0.0, 1.0 - bucket.tokens)
        return max(1, int(missing * 60.0 / per_minute + 0.999))


def admit_new_memories(ops: MemoryOps, principal: Principal | None = None) -> MemoryOps:
    """The ops to store: all of them while the key has room for its adds and updates, else only
    the forgets (all or nothing per block; a receipt note says so when headers are still open).
    Called by the turn just before queueing a block's ops; keyless requests have no limit."""
    principal = principal or current_principal()
    wanted = len(ops.add) + len(ops.update)
    if principal.limiter is None or principal.key_id is None or not wanted:
        return ops
    if principal.limiter.take(principal.key_id, "memories", principal.memories_per_minute,
                              wanted):
        return ops
    log.info("memory writes of key %s skipped: over %s new memories/min", principal.key_id,
             principal.memories_per_minute)
    principal.notes.append(
        f"memory writes skipped: key over its limit of {principal.memories_per_minute} "
        "new memories/min"
    )
    return MemoryOps(forget=ops.forget)
