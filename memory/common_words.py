"""The words a user's memories are full of, per user, cached.

A word found in a large share of one user's memories (their own name, in a log of their chats)
says nothing about which memory a query means, so recall leaves it out of the query
(`recall.common_terms`). Counting it per query in the full-text index costs a posting-list walk
per query word, which grows with every user's data (0.1 ms a word at 100k memories); counting it
here, over a sample of the user's newest memories, costs one pass per user and then a lookup.
The entry is refreshed when the user's memory count has moved by more than `refresh` of itself,
so writes from other processes are picked up too; a stale entry only makes ranking a little worse.
That count is itself a round trip on PostgreSQL (~0.5 ms of a ~7 ms search), so an entry checked
within `recheck_s` is used without it (`recent`): another replica's writes (a purge too) reach it
within that time, this process's own at once (every write expires the user's entries).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["CommonWords", "frequent_words"]

_WORD = re.compile(r"\w+", re.UNICODE)


def frequent_words(texts: Iterable[str], share: float) -> frozenset[str]:
    """The casefolded words found in at least `share` of `texts` (each text counts a word once)."""
    counts: Counter[str] = Counter()
    n = 0
    for text in texts:
        n += 1
        counts.update({w.casefold() for w in _WORD.findall(text)})
    if n == 0:
        return frozenset()
    floor = share * n
    return frozenset(w for w, c in counts.items() if c >= floor)


@dataclass(frozen=True)
class _Entry:
    total: int
    words: frozenset[str]
    checked: float  # monotonic time the count last agreed


class CommonWords:
    """An LRU of `frequent_words` per (user, share); thread-safe (recall runs on reader threads)."""

    # 16k users: a PostgreSQL team's 10k active users each keep their entry (a few words each,
    # ~1 KB), instead of recounting on nearly every query (two round trips).
    def __init__(
        self, max_users: int = 16384, sample: int = 500, refresh: float = 0.1,
        recheck_s: float = 300.0, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_users = max_users
        self.sample = sample
        self.refresh = refresh
        self.recheck_s = recheck_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, float], _Entry] = OrderedDict()
        # The shares asked for (one per preset in use): a user's entries are found by key,
        # not by a walk over every user's (a write expires, a small user drops, per request).
        self._shares: set[float] = set()
        self._lock = threading.Lock()

    def recent(self, user_id: str, share: float) -> frozenset[str] | None:
        """The user's common words if their count was checked within `recheck_s`, else None
        (then `get` with the count)."""
        key = (user_id, share)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or self._clock() - entry.checked > self.recheck_s:
                return None
            self._entries.move_to_end(key)
            return entry.words

    def get(
        self, user_id: str, total: int, share: float, newest: Callable[[int], list[str]]
    ) -> frozenset[str]:
        """The user's common words, given how many memories they have now (`total`);
        `newest(n)` reads the contents of their newest `n` memories when a count is due."""
        key = (user_id, share)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and abs(total - entry.total) <= self.refresh * entry.total:
                self._entries[key] = _Entry(entry.total, entry.words, self._clock())
                self._entries.move_to_end(key)
                return entry.words
        words = frequent_words(newest(self.sample), share)
        self._put(key, _Entry(total, words, self._clock()))
        return words

    def too_few(self, user_id: str, share: float) -> None:
        """The user has too few memories to have common words: `recent` says none (no read)
        until a write of this process expires the entry or `recheck_s` passes. A count of 0
        makes `get` count them once they have enough. Only where there is room: a small user
        never pushes out a counted one, whose recount reads `sample` contents."""
        self._put((user_id, share), _Entry(0, frozenset(), self._clock()), evict=False)

    def _put(self, key: tuple[str, float], entry: _Entry, *, evict: bool = True) -> None:
        """Store `entry`, pushing out the least recently used beyond `max_users`; with
        `evict=False` a new key is dropped instead when the cache is full."""
        with self._lock:
            if not evict and key not in self._entries and len(self._entries) >= self.max_users:
                return
            self._shares.add(key[1])
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_users:
                self._entries.popitem(last=False)

    def expire(self, user_ids: Iterable[str]) -> None:
        """Make these users' entries (every share) count again at their next use: this process
        just wrote to them. Their words are kept, so a count that still agrees keeps them."""
        with self._lock:
            for key in self._keys(set(user_ids)):
                entry = self._entries[key]
                self._entries[key] = _Entry(entry.total, entry.words, float("-inf"))

    def worth_counting(self, user_id: str, share: float) -> bool:
        """Whether a count made ahead of recall would be kept: the user has an entry, or the
        cache has room. Counting users a full cache would evict again at once only thrashes
        (a write to each of 10k users recounted every one of them)."""
        with self._lock:
            return (user_id, share) in self._entries or len(self._entries) < self.max_users

    def forget(self, user_id: str | None = None) -> None:
        """Drop one user's entries (after a purge), or every entry."""
        with self._lock:
            if user_id is None:
                self._entries.clear()
                return
            for key in self._keys({user_id}):
                del self._entries[key]

    def _keys(self, user_ids: set[str]) -> list[tuple[str, float]]:
        """The entries' keys of these users (under the lock)."""
        return [(u, s) for u in user_ids for s in self._shares if (u, s) in self._entries]
