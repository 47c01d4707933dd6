"""The rows recall weighs, column by column.

A recall weighs ~90 candidates (the index hits and their neighbours) and returns five. Turning
every candidate into a `Memory` (twenty fields, four parsed times) cost more than ranking them,
so the store hands recall only what fusion, conversation context and the ranker read of each
row, as lists and arrays: times as integer microseconds since the epoch (exact, so comparisons
agree with the `datetime` ones), embeddings as one matrix. `memories` builds the full `Memory`
of the few that are returned, once each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import numpy as np

from .models import Memory

__all__ = ["CandidateRows", "as_candidate_rows", "from_micros", "micros"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def micros(when: datetime) -> int:
    """`when` as integer microseconds since the epoch (aware times; naive ones read as UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // _MICROSECOND


def from_micros(us: int) -> datetime:
    """The aware UTC time `us` microseconds after the epoch (`micros`' inverse)."""
    return _EPOCH + us * _MICROSECOND


class CandidateRows:
    """Per row, in the order given: its row key, user, session, scope key, category, content,
    importance, created_at and valid_from (epoch microseconds), whether it is current (neither
    superseded nor forgotten) and its embedding (a zero row where it has none).

    `load(rowids)` returns the full memories of those rows (missing ones left out: a purge may
    have removed them since)."""

    def __init__(
        self, rowids: Sequence[int], user_id: Sequence[str], session_id: Sequence[str | None],
        scope_key: Sequence[str], category: Sequence[str], content: Sequence[str],
        importance: Sequence[float], created_at: Sequence[int], valid_from: Sequence[int],
        current: Sequence[bool], embeddings: np.ndarray | None, has_embedding: Sequence[bool],
        load: Callable[[Sequence[int]], Mapping[int, Memory]],
    ) -> None:
        self.rowids = list(rowids)
        self.at = {rid: i for i, rid in enumerate(self.rowids)}
        n = len(self.rowids)
        self.user_id = list(user_id)
        self.session_id = list(session_id)
        self.scope_key = list(scope_key)
        self.category = list(category)
        self.content = list(content)
        self.importance = np.asarray(importance, dtype=np.float64).reshape(n)
        self.created_at = np.asarray(created_at, dtype=np.int64).reshape(n)
        self.valid_from = np.asarray(valid_from, dtype=np.int64).reshape(n)
        self.current = np.asarray(current, dtype=bool).reshape(n)
        self.has_embedding = np.asarray(has_embedding, dtype=bool).reshape(n)
        self.embeddings = (
            np.zeros((n, 0), dtype=np.float32) if embeddings is None
            else np.asarray(embeddings, dtype=np.float32)
        )
        self._load = load
        self._memories: dict[int, Memory] = {}
        # Small integer codes, so "same user" / "same session" are array comparisons.
        users: dict[str, int] = {}
        self.user_code = np.array([users.setdefault(u, len(users)) for u in self.user_id],
                                  dtype=np.int64)
        sessions: dict[str, int] = {}
        self.session_code = np.array(  # 0: no session
            [0 if s is None else sessions.setdefault(s, len(sessions) + 1)
             for s in self.session_id], dtype=np.int64,
        )
        self.length = np.array([len(c) for c in self.content], dtype=np.float64)
        self.asks = np.array(["?" in c for c in self.content], dtype=bool)

    def __len__(self) -> int:
        return len(self.rowids)

    def __contains__(self, rowid: object) -> bool:
        return rowid in self.at

    def positions(self, rowids: Iterable[int]) -> np.ndarray:
        """The positions of `rowids` (each must be here)."""
        at = self.at
        return np.array([at[r] for r in rowids], dtype=np.int64)

    def embedding(self, rowid: int) -> np.ndarray | None:
        i = self.at.get(rowid)
        return None if i is None or not self.has_embedding[i] else self.embeddings[i]

    def memories(self, rowids: Sequence[int]) -> dict[int, Memory]:
        """The full memories of `rowids` that still exist, built once each."""
        missing = [r for r in rowids if r not in self._memories]
        if missing:
            self._memories.update(self._load(missing))
        return {r: self._memories[r] for r in rowids if r in self._memories}

    def joined(self, other: CandidateRows, rowids: Iterable[int]) -> CandidateRows:
        """The rows of `rowids` found in `other` or else here (a row in neither is left
        out, as a read leaves out a purged row): a read of part of the rows earlier (recall
        reads the BM25 hits' while the query is embedded) completed by a read of the rest."""
        picked = [
            (src, i) for rid in dict.fromkeys(rowids)
            if (i := (src := other).at.get(rid)) is not None
            or (i := (src := self).at.get(rid)) is not None
        ]
        width = max(self.embeddings.shape[1], other.embeddings.shape[1])
        matrix = np.zeros((len(picked), width), dtype=np.float32)
        has = []
        for k, (src, i) in enumerate(picked):
            ok = bool(src.has_embedding[i]) and src.embeddings.shape[1] == width
            if ok:
                matrix[k] = src.embeddings[i]
            has.append(ok)

        def column(name: str) -> list[object]:
            return [getattr(src, name)[i] for src, i in picked]

        def load(wanted: Sequence[int]) -> Mapping[int, Memory]:
            """Each row's memory from the read it came from (a store's loader may know only
            the rows of its own read)."""
            later = [r for r in wanted if r in other.at]
            found = other.memories(later) if later else {}
            rest = [r for r in wanted if r not in other.at]
            return {**found, **self.memories(rest)} if rest else found

        return CandidateRows(
            [src.rowids[i] for src, i in picked], column("user_id"), column("session_id"),  # type: ignore[arg-type]
            column("scope_key"), column("category"), column("content"),  # type: ignore[arg-type]
            column("importance"), column("created_at"), column("valid_from"),  # type: ignore[arg-type]
            column("current"), matrix if width else None, has, load,  # type: ignore[arg-type]
        )

    @classmethod
    def from_rows(
        cls, rows: Sequence[Sequence[object]],
        load: Callable[[Sequence[int]], Mapping[int, Memory]],
    ) -> CandidateRows:
        """Rows as a store's columnar read returns them: the constructor's first ten columns in
        its order, then the embedding as float32 bytes or None."""
        columns: list[Sequence[object]] = list(zip(*rows, strict=True)) or [()] * 11
        blobs = columns[10]
        has = [False] * len(rows)
        matrix = None
        size = next((len(b) for b in blobs if b is not None), 0)  # type: ignore[arg-type]
        if size:
            # One buffer, one matrix; a row of another model's size counts as having none.
            has = [b is not None and len(b) == size for b in blobs]  # type: ignore[arg-type]
            zero = bytes(size)
            matrix = np.frombuffer(
                b"".join(b if ok else zero for b, ok in zip(blobs, has, strict=True)),  # type: ignore[arg-type]
                dtype=np.float32,
            ).reshape(len(rows), size // 4)
        return cls(*columns[:10], matrix, has, load)  # type: ignore[arg-type]

    @classmethod
    def of(
        cls, memories: Mapping[int, Memory], embeddings: Mapping[int, np.ndarray] | None = None
    ) -> CandidateRows:
        """Rows from memories already built (and their embeddings, by row key): the generic
        path of a store without a columnar read, and of tests."""
        vectors = embeddings or {}
        rowids = list(memories)
        mems = [memories[r] for r in rowids]
        dim = next((len(v) for v in vectors.values()), 0)
        matrix = np.zeros((len(rowids), dim), dtype=np.float32)
        has = [r in vectors for r in rowids]
        for i, r in enumerate(rowids):
            if has[i]:
                matrix[i] = vectors[r]
        rows = cls(
            rowids, [m.user_id for m in mems], [m.session_id for m in mems],
            [m.scope.key for m in mems], [m.category.value for m in mems],
            [m.content for m in mems], [m.importance for m in mems],
            [micros(m.created_at) for m in mems], [micros(m.valid_from) for m in mems],
            [m.is_current and m.forgotten_at is None for m in mems], matrix, has,
            lambda wanted: {r: memories[r] for r in wanted if r in memories},
        )
        rows._memories.update(memories)
        return rows


def as_candidate_rows(rows: CandidateRows | Mapping[int, Memory]) -> CandidateRows:
    """`rows` as `CandidateRows` (a mapping of memories by row key is converted)."""
    return rows if isinstance(rows, CandidateRows) else CandidateRows.of(rows)
