"""Heavy users' vectors: a scan of sign bits in blocks, then an exact float re-rank.

sqlite-vec 0.1.9's vec0 is brute force over float32 and picks each chunk's top k with a k x n
selection, so one user's KNN grows with their vectors (issue 14: 57 ms at 100k, k=50) and
oversampling a larger k costs more still. Past `HEAVY_LIMIT` vectors a user's vectors leave vec0
for three plain tables (migration m005):

- `memory_vectors_heavy`: one float32 row per vector, read by rowid for the re-rank;
- `memory_vector_blocks`: `BLOCK_SLOTS` vectors to a row as packed arrays: rowids, sign bits of
  the vector minus the user's mean vector (`center`, fixed when they turned heavy; centring makes
  the bits split the user's own vectors instead of all agreeing on MiniLM's common direction),
  and a scope label and a category label per slot;
- `memory_vector_labels`: the user's scope keys and categories as small integers.

A search reads the user's blocks (~200 rows, ~6 MB at 100k), takes Hamming distances to the
query's bits in numpy, keeps the `candidates(k)` nearest that pass the scope and category
filters, and re-ranks those by exact cosine. That is still a linear scan, but of 48 bytes per
vector instead of 1,536 and without vec0's per-chunk selection: cheap, not sub-linear.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..models import MemoryCategory
from .cached_vectors import exclude

__all__ = [
    "BLOCK_SLOTS",
    "HEAVY_LIMIT",
    "HeavyUser",
    "HeavyVectors",
    "move_to_heavy",
]

HEAVY_LIMIT = 2048
BLOCK_SLOTS = 512
# Decoded codes kept per process: ~64 bytes a vector, so a 100k-memory user is ~6.4 MB.
CACHE_BYTES = 128 * 1024 * 1024
_FREE = np.iinfo(np.int64).min  # a slot whose vector was removed
_MAX_PENDING = 10_000  # writes queued on a cached entry before it is dropped instead
_USERS = "memory_vector_heavy_users"
_FLOATS = "memory_vectors_heavy"
_BLOCKS = "memory_vector_blocks"
_LABELS = "memory_vector_labels"


def _scope_label(scope_key: str) -> str:
    return "s:" + scope_key


def _category_label(category: MemoryCategory | str) -> str:
    return "c:" + (category.value if isinstance(category, MemoryCategory) else category)


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


@dataclass(frozen=True)
class HeavyUser:
    user_id: str
    center: np.ndarray
    version: int


@dataclass(frozen=True)
class _Codes:
    """A user's blocks concatenated: bits word-major, (words, slots), for contiguous XORs."""

    rowids: np.ndarray
    words: np.ndarray
    scopes: np.ndarray
    categories: np.ndarray

    @property
    def size(self) -> int:
        return len(self.rowids)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.rowids, self.words, self.scopes, self.categories))


_Op = tuple[str, Any]  # ("add", (rowid, words, scope id, category id)) or ("remove", rowids)


@dataclass
class _Entry:
    """A cached user's codes at `version`, and this process's own writes since they were read
    (applied at the next read): a write keeps the cache warm instead of emptying it. If such a
    write rolls back, the stored version goes back to the one before it, which differs from
    `version`, so the entry is read afresh."""

    version: int
    codes: _Codes
    pending: list[_Op] = field(default_factory=list)

    def settle(self) -> None:
        if not self.pending:
            return
        c = self.codes
        rowids, words, scopes, cats = c.rowids, c.words, c.scopes, c.categories
        adds: list[tuple[int, np.ndarray, int, int]] = []

        def flush() -> None:
            nonlocal rowids, words, scopes, cats
            if adds:  # one copy for a run of adds, not one each
                rowids = np.concatenate([rowids, np.array([a[0] for a in adds], np.int64)])
                words = np.concatenate([words, np.stack([a[1] for a in adds], axis=1)], axis=1)
                scopes = np.concatenate([scopes, np.array([a[2] for a in adds], np.int32)])
                cats = np.concatenate([cats, np.array([a[3] for a in adds], np.int32)])
                adds.clear()

        for op, arg in self.pending:
            if op == "add":
                adds.append(arg)
                continue
            flush()
            rowids = rowids.copy()
            rowids[np.isin(rowids, list(arg))] = _FREE
        flush()
        self.codes = _Codes(rowids, words, scopes, cats)
        self.pending = []


class _Block:
    """One row of `memory_vector_blocks` as numpy arrays."""

    def __init__(self, rowids: np.ndarray, bits: np.ndarray, scopes: np.ndarray,
                 categories: np.ndarray) -> None:
        self.rowids, self.bits, self.scopes, self.categories = rowids, bits, scopes, categories

    @classmethod
    def read(cls, row: Sequence[Any], width: int) -> _Block:
        return cls(
            np.frombuffer(row[0], dtype=np.int64).copy(),
            np.frombuffer(row[1], dtype=np.uint8).reshape(-1, width).copy(),
            np.frombuffer(row[2], dtype=np.int32).copy(),
            np.frombuffer(row[3], dtype=np.int32).copy(),
        )

    def blobs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rowids.tobytes(), self.bits.tobytes(), self.scopes.tobytes(),
                self.categories.tobytes())


class HeavyVectors:
    """The heavy tier of `SqliteVecIndex`, on the connection `conn()` returns (the caller's
    transaction holds every write)."""

    def __init__(self, conn: Callable[[], Any], dimension: int, *, oversample: int = 20,
                 min_candidates: int = 500, cache_bytes: int = CACHE_BYTES) -> None:
        self._conn = conn
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self.dimension = dimension
        self.oversample = oversample
        self.min_candidates = min_candidates
        self.width = -(-dimension // 64) * 8  # bytes of bits per slot, whole uint64 words

    @property
    def conn(self) -> Any:
        return self._conn()

    # --- codes -----------------------------------------------------------------------------

    def _bits(self, vectors: np.ndarray, center: np.ndarray) -> np.ndarray:
        """Sign bits of `vectors - center`, `self.width` bytes per row."""
        signs = (np.atleast_2d(vectors) - center) > 0
        padded = np.zeros((signs.shape[0], self.width * 8), dtype=bool)
        padded[:, : self.dimension] = signs
        return np.packbits(padded, axis=1)

    def _label_ids(self, user_id: str, labels: Iterable[str], *, create: bool) -> dict[str, int]:
        wanted = list(dict.fromkeys(labels))
        conn = self.conn
        if create:
            conn.executemany(
                f"INSERT OR IGNORE INTO {_LABELS}(user_id, label) VALUES (?, ?)",
                [(user_id, label) for label in wanted],
            )
        rows = conn.execute(
            f"SELECT label, id FROM {_LABELS} WHERE user_id = ?"
            f" AND label IN ({_placeholders(len(wanted))})",
            [user_id, *wanted],
        ).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    # --- tier membership -------------------------------------------------------------------

    def user(self, user_id: str) -> HeavyUser | None:
        """The user's center and version if they are in this tier, else None."""
        row = self.conn.execute(
            f"SELECT center, version FROM {_USERS} WHERE user_id = ?", (user_id,)
        ).fetchone()
        if row is None:
            return None
        return HeavyUser(user_id, np.frombuffer(row[0], dtype=np.float32), int(row[1]))

    def _changed(self, user_id: str, op: _Op) -> None:
        """A new version for the user's codes, in the writing transaction, and `op` queued on
        the cached entry if it was current. Random, not a counter: a rolled-back write's
        number must never come back for other contents."""
        conn = self.conn
        before = conn.execute(
            f"SELECT version FROM {_USERS} WHERE user_id = ?", (user_id,)
        ).fetchone()
        version = secrets.randbits(62)
        conn.execute(f"UPDATE {_USERS} SET version = ? WHERE user_id = ?", (version, user_id))
        with self._lock:
            entry = self._cache.get(user_id)
            if entry is None:
                return
            if (before is not None and entry.version == int(before[0])
                    and len(entry.pending) < _MAX_PENDING):
                entry.version = version
                entry.pending.append(op)
            else:
                self._drop(user_id)

    def _drop(self, user_id: str) -> None:
        """Forget a cached entry; the caller holds the lock."""
        gone = self._cache.pop(user_id, None)
        self._cached_bytes -= gone.codes.nbytes if gone is not None else 0

    def admit(self, user_id: str, rows: Sequence[tuple[int, str, str, bytes]]) -> None:
        """Make `user_id` heavy with these (rowid, scope_key, category, float32 bytes) rows,
        which the caller has taken out of the other tiers."""
        vectors = np.stack([np.frombuffer(r[3], dtype=np.float32) for r in rows])
        center = vectors.mean(axis=0).astype(np.float32)
        conn = self.conn
        conn.execute(
            f"INSERT INTO {_USERS}(user_id, center, version) VALUES (?, ?, ?)",
            (user_id, center.tobytes(), secrets.randbits(62)),
        )
        labels = self._label_ids(
            user_id, [_scope_label(r[1]) for r in rows] + [_category_label(r[2]) for r in rows],
            create=True,
        )
        bits = self._bits(vectors, center)
        for block, start in enumerate(range(0, len(rows), BLOCK_SLOTS)):
            part = rows[start : start + BLOCK_SLOTS]
            chunk = _Block(
                np.array([r[0] for r in part], dtype=np.int64),
                bits[start : start + len(part)],
                np.array([labels[_scope_label(r[1])] for r in part], dtype=np.int32),
                np.array([labels[_category_label(r[2])] for r in part], dtype=np.int32),
            )
            conn.execute(
                f"INSERT INTO {_BLOCKS}(user_id, block, rowids, bits, scopes, categories)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (user_id, block, *chunk.blobs()),
            )
            conn.executemany(
                f"INSERT INTO {_FLOATS}(rowid, user_id, block, embedding) VALUES (?, ?, ?, ?)",
                [(r[0], user_id, block, r[3]) for r in part],
            )

    # --- writes ----------------------------------------------------------------------------

    def add(self, rowid: int, user: HeavyUser, scope_key: str, category: MemoryCategory,
            vector: np.ndarray) -> None:
        conn = self.conn
        user_id, center = user.user_id, user.center
        labels = self._label_ids(
            user_id, (_scope_label(scope_key), _category_label(category)), create=True
        )
        last = conn.execute(
            f"SELECT block, rowids, bits, scopes, categories FROM {_BLOCKS}"
            " WHERE user_id = ? ORDER BY block DESC LIMIT 1",
            (user_id,),
        ).fetchone()
        fields = (
            np.array([rowid], dtype=np.int64), self._bits(vector, center),
            np.array([labels[_scope_label(scope_key)]], dtype=np.int32),
            np.array([labels[_category_label(category)]], dtype=np.int32),
        )
        self._changed(user_id, ("add", (
            rowid, fields[1].view(np.uint64).reshape(-1), int(fields[2][0]), int(fields[3][0]),
        )))
        if last is not None and len(last[1]) // 8 < BLOCK_SLOTS:
            block_no = int(last[0])
            old = _Block.read(last[1:], self.width)
            grown = _Block(*(np.concatenate([a, b]) for a, b in zip(
                (old.rowids, old.bits, old.scopes, old.categories), fields, strict=True
            )))
            conn.execute(
                f"UPDATE {_BLOCKS} SET rowids = ?, bits = ?, scopes = ?, categories = ?"
                " WHERE user_id = ? AND block = ?",
                (*grown.blobs(), user_id, block_no),
            )
        else:
            block_no = 0 if last is None else int(last[0]) + 1
            conn.execute(
                f"INSERT INTO {_BLOCKS}(user_id, block, rowids, bits, scopes, categories)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (user_id, block_no, *_Block(*fields).blobs()),
            )
        conn.execute(
            f"INSERT INTO {_FLOATS}(rowid, user_id, block, embedding) VALUES (?, ?, ?, ?)",
            (rowid, user_id, block_no, np.asarray(vector, dtype=np.float32).tobytes()),
        )

    def remove(self, rowids: Sequence[int]) -> None:
        """Free the slots of these rowids (those in this tier); a user left with no vectors
        leaves the tier with their center and labels, so a purge leaves nothing behind."""
        if not rowids:
            return
        conn = self.conn
        found: dict[tuple[str, int], list[int]] = {}
        for start in range(0, len(rowids), 500):
            part = [int(r) for r in rowids[start : start + 500]]
            for rid, user, block in conn.execute(
                f"SELECT rowid, user_id, block FROM {_FLOATS}"
                f" WHERE rowid IN ({_placeholders(len(part))})",
                part,
            ).fetchall():
                found.setdefault((str(user), int(block)), []).append(int(rid))
        for user in {u for u, _ in found}:
            self._changed(user, ("remove", {r for (u, _), rids in found.items() if u == user
                                            for r in rids}))
        for (user, block), rids in found.items():
            row = conn.execute(
                f"SELECT rowids FROM {_BLOCKS} WHERE user_id = ? AND block = ?", (user, block)
            ).fetchone()
            slots = np.frombuffer(row[0], dtype=np.int64).copy()
            slots[np.isin(slots, rids)] = _FREE
            if (slots == _FREE).all():
                conn.execute(
                    f"DELETE FROM {_BLOCKS} WHERE user_id = ? AND block = ?", (user, block)
                )
            else:
                conn.execute(
                    f"UPDATE {_BLOCKS} SET rowids = ? WHERE user_id = ? AND block = ?",
                    (slots.tobytes(), user, block),
                )
            conn.executemany(f"DELETE FROM {_FLOATS} WHERE rowid = ?", [(r,) for r in rids])
        for user in {u for u, _ in found}:
            self._drop_unused_labels(user)

    def _drop_unused_labels(self, user_id: str) -> None:
        conn = self.conn
        used: set[int] = set()
        live = False
        for slots, scopes, cats in conn.execute(
            f"SELECT rowids, scopes, categories FROM {_BLOCKS} WHERE user_id = ?", (user_id,)
        ):
            keep = np.frombuffer(slots, dtype=np.int64) != _FREE
            live = live or bool(keep.any())
            used.update(np.frombuffer(scopes, dtype=np.int32)[keep].tolist())
            used.update(np.frombuffer(cats, dtype=np.int32)[keep].tolist())
        if not live:
            conn.execute(f"DELETE FROM {_BLOCKS} WHERE user_id = ?", (user_id,))
            conn.execute(f"DELETE FROM {_LABELS} WHERE user_id = ?", (user_id,))
            conn.execute(f"DELETE FROM {_USERS} WHERE user_id = ?", (user_id,))
            with self._lock:  # nor in this process's memory
                self._drop(user_id)
            return
        ids = [int(r[0]) for r in conn.execute(
            f"SELECT id FROM {_LABELS} WHERE user_id = ?", (user_id,)
        )]
        conn.executemany(
            f"DELETE FROM {_LABELS} WHERE id = ?", [(i,) for i in ids if i not in used]
        )

    # --- reads -----------------------------------------------------------------------------

    def candidates(self, k: int) -> int:
        return max(k * self.oversample, self.min_candidates)

    def search(
        self, query: np.ndarray, user: HeavyUser, *,
        scope_keys: Sequence[str] | None, categories: Sequence[MemoryCategory] | None, k: int,
    ) -> list[tuple[int, float]]:
        codes = self._codes(user)
        if codes.size == 0:
            return []
        keep = codes.rowids != _FREE
        for labels, column, label in (
            (scope_keys, codes.scopes, _scope_label),
            (categories or None, codes.categories, _category_label),
        ):
            if labels is None:
                continue
            ids = list(self._label_ids(user.user_id, map(label, labels), create=False).values())
            if not ids:
                return []
            keep &= np.isin(column, ids)
        qwords = self._bits(query, user.center).view(np.uint64).reshape(-1)
        distance = np.zeros(codes.size, dtype=np.uint16)
        for j, word in enumerate(qwords):  # word-major layout: contiguous, no row reductions
            distance += np.bitwise_count(codes.words[j] ^ word)
        exclude(distance, keep, len(qwords) * 64)
        want = min(self.candidates(k), int(keep.sum()))
        if want == 0:
            return []
        nearest = np.argpartition(distance, want - 1)[:want] if want < codes.size else (
            np.flatnonzero(keep)
        )
        return self._rerank(query, codes.rowids[nearest].tolist(), k)

    def _codes(self, user: HeavyUser) -> _Codes:
        """The user's blocks as arrays, from the cache while their version is unchanged."""
        with self._lock:
            hit = self._cache.get(user.user_id)
            if hit is not None and hit.version == user.version:
                before = hit.codes.nbytes
                hit.settle()
                self._cached_bytes += hit.codes.nbytes - before
                self._cache.move_to_end(user.user_id)
                return hit.codes
        codes = self._read_codes(user.user_id)
        with self._lock:
            self._drop(user.user_id)
            if codes.nbytes <= self.cache_bytes:
                self._cache[user.user_id] = _Entry(user.version, codes)
                self._cached_bytes += codes.nbytes
            while self._cached_bytes > self.cache_bytes:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.codes.nbytes
        return codes

    def _read_codes(self, user_id: str) -> _Codes:
        rows = self.conn.execute(
            f"SELECT rowids, bits, scopes, categories FROM {_BLOCKS} WHERE user_id = ?"
            " ORDER BY block",
            (user_id,),
        ).fetchall()
        rowids = np.frombuffer(b"".join(r[0] for r in rows), dtype=np.int64)
        words = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.uint64)
        return _Codes(
            rowids,
            np.ascontiguousarray(words.reshape(len(rowids), self.width // 8).T),
            np.frombuffer(b"".join(r[2] for r in rows), dtype=np.int32),
            np.frombuffer(b"".join(r[3] for r in rows), dtype=np.int32),
        )

    def _rerank(self, query: np.ndarray, rowids: list[int], k: int) -> list[tuple[int, float]]:
        if not rowids:
            return []
        found: list[tuple[int, bytes]] = []
        for start in range(0, len(rowids), 5000):
            part = rowids[start : start + 5000]
            found += self.conn.execute(
                f"SELECT rowid, embedding FROM {_FLOATS}"
                f" WHERE rowid IN ({_placeholders(len(part))})",
                part,
            ).fetchall()
        matrix = np.frombuffer(b"".join(r[1] for r in found), dtype=np.float32)
        matrix = matrix.reshape(len(found), self.dimension)
        q = np.asarray(query, dtype=np.float32)
        norms = np.linalg.norm(matrix, axis=1) * float(np.linalg.norm(q))
        sims = (matrix @ q) / np.where(norms > 0, norms, 1.0)
        order = np.argsort(-sims, kind="stable")[:k]
        return [(int(found[i][0]), float(sims[i])) for i in order]

    def count(self, user_id: str | None = None) -> int:
        if user_id is None:
            return int(self.conn.execute(f"SELECT count(*) FROM {_FLOATS}").fetchone()[0])
        return int(self.conn.execute(
            f"SELECT count(*) FROM {_FLOATS} WHERE user_id = ?", (user_id,)
        ).fetchone()[0])


def move_to_heavy(conn: Any, heavy: HeavyVectors, user_id: str) -> None:
    """Move every vector of `user_id` from their vec0 partition into the heavy tier."""
    rows = [
        (int(r[0]), str(r[1]), str(r[2]), bytes(r[3]))
        for r in conn.execute(
            "SELECT rowid, scope_key, category, embedding FROM memory_vectors WHERE user_id = ?"
            " ORDER BY rowid",
            (user_id,),
        ).fetchall()
    ]
    if not rows:
        return
    conn.executemany("DELETE FROM memory_vectors WHERE rowid = ?", [(r[0],) for r in rows])
    heavy.admit(user_id, rows)
