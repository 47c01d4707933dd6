"""Per-key rate limits: a token bucket per key and kind (requests, new memories), in memory, per
process. Pure logic with an injectable clock; the auth layer decides what being over means."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RateLimiter"]


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

    def take(self, key: str, kind: str, per_minute: int | None, amount: int = 1) -> bool:
        if per_minute is None:
            return True
        now = self._clock()
        bucket = self._buckets.get((key, kind))
        if bucket is None:
            bucket = self._buckets[(key, kind)] = _Bucket(float(per_minute), now)
        bucket.tokens = min(
            float(per_minute), bucket.tokens + (now - bucket.updated) * per_minute / 60.0
        )
        bucket.updated = now
        if bucket.tokens < amount:
            return False
        bucket.tokens -= amount
        return True

    def retry_after(self, key: str, kind: str, per_minute: int | None) -> int:
        """Whole seconds until one token is back (for Retry-After)."""
        bucket = self._buckets.get((key, kind))
        if per_minute is None or per_minute <= 0 or bucket is None:
            return 60
        missing = max(0.0, 1.0 - bucket.tokens)
        return max(1, int(missing * 60.0 / per_minute + 0.999))
