"""Operator limits on new memories: how many current memories one user may have, and how many
users may appear for the first time per minute.

Every new user id costs a vector partition in the file, so without a limit any client can fill
the disk by inventing user ids. The unit of work asks `check_new_memory` before each insert (a
reinforce or a supersede adds no current memory, so it is never refused); an add over a limit
raises `LimitExceededError`, which the outbox worker counts as `skipped_limit` and the direct API
passes to its caller. The new-users window is kept per process: N processes on one file admit up
to N times the rate.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from .errors import LimitExceededError
from .models import MemoryConfig, MemoryFilter
from .ports import MemoryStore

__all__ = ["WriteLimits"]

_WINDOW_S = 60.0


class WriteLimits:
    def __init__(
        self, config: MemoryConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_user = config.max_memories_per_user
        self.new_users_per_minute = config.max_new_users_per_minute
        self._clock = clock
        self._new_users: deque[float] = deque()

    @property
    def enabled(self) -> bool:
        return self.per_user > 0 or self.new_users_per_minute > 0

    def check_new_memory(self, store: MemoryStore, user_id: str) -> None:
        """Raise `LimitExceededError` if one more current memory of `user_id` is over a limit;
        otherwise count the user as new when they have no memory at all yet."""
        if not self.enabled:
            return
        if self.per_user > 0:
            current = store.count(MemoryFilter(user_id=user_id, all_scopes=True, limit=None))
            if current >= self.per_user:
                raise LimitExceededError(
                    f"user {user_id!r} has {current} memories, the limit is {self.per_user} "
                    "(max_memories_per_user)", limit="max_memories_per_user",
                )
        if self.new_users_per_minute > 0 and self._is_new(store, user_id):
            now = self._clock()
            while self._new_users and now - self._new_users[0] >= _WINDOW_S:
                self._new_users.popleft()
            if len(self._new_users) >= self.new_users_per_minute:
                raise LimitExceededError(
                    f"new user {user_id!r} refused: {len(self._new_users)} new users in the "
                    f"last minute, the limit is {self.new_users_per_minute} "
                    "(max_new_users_per_minute)", limit="max_new_users_per_minute",
                )
            self._new_users.append(now)

    @staticmethod
    def _is_new(store: MemoryStore, user_id: str) -> bool:
        flt = MemoryFilter(
            user_id=user_id, all_scopes=True, include_superseded=True, limit=1
        )
        return store.count(flt) == 0
