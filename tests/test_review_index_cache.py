"""Review regressions of the per-process index copies (user_cache.py, index_log.py): a copy
never absorbs a change log it cannot trust, so a removed row is never served again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headroom.memory.adapters import (
    FTS5TextIndex,
    SqliteVecIndex,
    index_log,
    user_cache,
)
from headroom.memory.adapters.user_cache import UserCache
from headroom.memory.db import Database
from headroom.memory.models import MemoryCategory
from tests.index_files import index_file, unit

pytestmark = pytest.mark.sqlite_only("the in-memory copies serve the SQLite indexes")

DIM = 16
FACT = MemoryCategory.FACT
SCOPE = "ann\x1f\x1f"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return index_file(tmp_path / "review.db", DIM)


def _vectors(db: Database, cache: UserCache | bool) -> SqliteVecIndex:
    return SqliteVecIndex(db, DIM, 8, compact_limit=8, heavy_limit=64, cache=cache)


def _hits(index: SqliteVecIndex, query: np.ndarray, k: int = 50) -> set[int]:
    return {r for r, _ in index.search(query, "ann", scope_keys=None, categories=None, k=k)}


def _seeded(index: SqliteVecIndex, seed: int, total: int, added: int) -> np.ndarray:
    """`total` seeded unit vectors, the first `added` of them added for ann as rows 1.. in one
    transaction."""
    stored = unit(np.random.default_rng(seed).standard_normal((total, DIM)))
    with index.db.transaction():
        for i in range(added):
            index.add(i + 1, "ann", SCOPE, FACT, stored[i])
    return stored


def test_a_users_last_row_removed_then_a_new_one_added_never_brings_the_old_back(
    path: Path,
) -> None:
    """The user's log is forgotten with their last row; the next add starts a new log one seq
    after the copy's. The copy must not replay across that gap (it missed the removal)."""
    reader = _vectors(Database(path), UserCache())
    writer = _vectors(Database(path), UserCache())
    rng = np.random.default_rng(1)
    a, b = unit(rng.standard_normal((2, DIM)))
    with writer.db.transaction():
        writer.add(1, "ann", SCOPE, FACT, a)
    assert _hits(reader, a) == {1}  # the reader's copy holds row 1 at the log's newest seq
    with writer.db.transaction():
        writer.remove([1])  # ann's last row: her log and state row go
    with writer.db.transaction():
        writer.add(2, "ann", SCOPE, FACT, b)
    assert _hits(reader, a) == {2}


def test_text_a_users_last_row_removed_then_a_new_one_added_never_brings_the_old_back(
    path: Path,
) -> None:
    reader = FTS5TextIndex(Database(path), cache=UserCache())
    writer = FTS5TextIndex(Database(path), cache=UserCache())
    with writer.db.transaction():
        writer.add(1, "ann", SCOPE, FACT, "sailing boats on the lake")
    search = lambda q: [r for r, _ in reader.search(  # noqa: E731
        q, "ann", scope_keys=None, categories=None, k=10)]
    assert search("sailing") == [1]
    with writer.db.transaction():
        writer.remove([1])
    with writer.db.transaction():
        writer.add(2, "ann", SCOPE, FACT, "boats in the harbour")
    assert search("sailing") == []
    assert search("boats") == [2]


def _after_first_state_read(
    monkeypatch: pytest.MonkeyPatch, write: Any
) -> None:
    """Run `write` (another connection's commits) right after the next search has read the
    user's log state, before it reads the log: the window a concurrent writer can hit."""
    real = user_cache.state
    fired: list[bool] = []

    def state(conn: Any, index: str, user: str) -> tuple[int, int] | None:
        found = real(conn, index, user)
        if not fired:
            fired.append(True)
            write()
        return found

    monkeypatch.setattr(user_cache, "state", state)


def test_a_log_trimmed_between_the_state_read_and_the_replay_is_not_replayed(
    path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(index_log, "KEEP", 4)
    reader = _vectors(Database(path), UserCache())
    writer = _vectors(Database(path), UserCache())
    stored = _seeded(writer, 2, 40, 6)
    assert _hits(reader, stored[0]) == set(range(1, 7))
    with writer.db.transaction():
        writer.remove([1])

    def trim() -> None:  # enough single adds that the log drops the removal of row 1
        for i in range(6, 30):
            with writer.db.transaction():
                writer.add(i + 1, "ann", SCOPE, FACT, stored[i])

    _after_first_state_read(monkeypatch, trim)
    assert 1 not in _hits(reader, stored[0])
    assert _hits(reader, stored[0]) == set(range(2, 31))


def test_a_user_purged_and_back_between_the_state_read_and_the_replay_is_rebuilt(
    path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reader = _vectors(Database(path), UserCache())
    writer = _vectors(Database(path), UserCache())
    stored = _seeded(writer, 3, 10, 3)
    assert _hits(reader, stored[0]) == {1, 2, 3}
    with writer.db.transaction():
        writer.add(4, "ann", SCOPE, FACT, stored[3])  # the reader's copy is one seq behind

    def purge_and_return() -> None:
        with writer.db.transaction():
            writer.remove([1, 2, 3, 4])
        with writer.db.transaction():
            writer.add(5, "ann", SCOPE, FACT, stored[4])

    _after_first_state_read(monkeypatch, purge_and_return)
    assert _hits(reader, stored[0]) == {5}


def test_other_users_writes_do_not_push_a_users_log_past_their_copy(
    path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The log keeps `KEEP` entries per user, counted in that user's entries: a quiet user's
    copy replays their next write however much other users wrote meanwhile, not a rebuild."""
    monkeypatch.setattr(index_log, "KEEP", 4)
    cache = UserCache()
    reader = _vectors(Database(path), cache)
    writer = _vectors(Database(path), UserCache())
    stored = _seeded(writer, 4, 60, 3)
    assert _hits(reader, stored[0]) == {1, 2, 3}
    copy = cache.get(reader._owner, "ann")
    for i in range(3, 40):  # bob writes far more than ann's log keeps
        with writer.db.transaction():
            writer.add(i + 1, "bob", "bob\x1f\x1f", FACT, stored[i])
    with writer.db.transaction():
        writer.remove([2])
    assert _hits(reader, stored[0]) == {1, 3}
    assert cache.get(reader._owner, "ann") is copy  # replayed, not read again
    conn = reader.db.conn
    kept = conn.execute(
        "SELECT count(*) FROM memory_index_log WHERE index_name = 'vector' AND user_key = ?",
        ("bob",),
    ).fetchone()[0]
    assert 4 <= kept < 8  # bob's own log is trimmed to KEEP-2xKEEP entries
    assert _hits(reader, stored[0], k=100) == {1, 3}
    bob = {r for r, _ in reader.search(
        stored[5], "bob", scope_keys=None, categories=None, k=100)}
    assert bob == set(range(4, 41))


@pytest.mark.parametrize("rows", [20, 70])  # read right here; read on a background thread
def test_a_copy_larger_than_the_cache_is_not_read_again_on_every_search(
    path: Path, monkeypatch: pytest.MonkeyPatch, rows: int,
) -> None:
    from headroom.memory.adapters import sqlite_vec_index

    reads: list[str | None] = []
    real = sqlite_vec_index.read_rows

    def counted(conn: Any, user_id: str | None, rowids: Any) -> Any:
        if rowids is None:
            reads.append(user_id)
        return real(conn, user_id, rowids)

    monkeypatch.setattr(sqlite_vec_index, "read_rows", counted)
    index = _vectors(Database(path), UserCache(max_bytes=1000))  # no user fits
    stored = _seeded(index, 5, rows, rows)
    for _ in range(5):
        assert _hits(index, stored[0], k=100) == set(range(1, rows + 1))  # the file answers
        index.builder.join()
    assert reads == ["ann"]


@pytest.mark.parametrize("failing", ["build", "replay"])
def test_a_copy_that_cannot_be_read_leaves_the_search_to_the_file(
    path: Path, monkeypatch: pytest.MonkeyPatch, failing: str,
) -> None:
    from headroom.memory.adapters import cached_vectors, sqlite_vec_index

    cache = UserCache()
    index = _vectors(Database(path), cache)
    stored = _seeded(index, 6, 10, 5)
    if failing == "replay":
        assert _hits(index, stored[0]) == set(range(1, 6))  # a copy, to replay into
        with index.db.transaction():
            index.add(6, "ann", SCOPE, FACT, stored[5])

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("cannot read the copy")

    if failing == "build":
        monkeypatch.setattr(sqlite_vec_index, "read_rows", broken)
    else:
        monkeypatch.setattr(cached_vectors.UserVectors, "replay", broken)
    assert _hits(index, stored[0]) == set(range(1, 7 if failing == "replay" else 6))
    assert cache.get(index._owner, "ann") is None  # nothing half read is kept
    monkeypatch.undo()
    with index.db.transaction():
        index.remove([1])
    assert _hits(index, stored[0]) == set(range(2, 7 if failing == "replay" else 6))


def test_a_text_copy_that_cannot_be_read_leaves_the_search_to_fts5(
    path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from headroom.memory.adapters import cached_text

    index = FTS5TextIndex(Database(path), cache=UserCache())
    with index.db.transaction():
        index.add(1, "ann", SCOPE, FACT, "sailing boats on the lake")

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("cannot read the copy")

    monkeypatch.setattr(cached_text.UserPostings, "__init__", broken)
    found = index.search("sailing", "ann", scope_keys=None, categories=None, k=5)
    assert [r for r, _ in found] == [1]


def test_a_failing_copy_search_leaves_the_answer_to_the_file(
    path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from headroom.memory.adapters import cached_text, cached_vectors

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("cannot search the copy")

    vectors = _vectors(Database(path), UserCache())
    text = FTS5TextIndex(vectors.db, cache=UserCache())
    rng = np.random.default_rng(7)
    stored = unit(rng.standard_normal((3, DIM)))
    with vectors.db.transaction():
        for i in range(3):
            vectors.add(i + 1, "ann", SCOPE, FACT, stored[i])
            text.add(i + 1, "ann", SCOPE, FACT, f"sailing boat number {i}")
    monkeypatch.setattr(cached_vectors.UserVectors, "search", broken)
    monkeypatch.setattr(cached_text.UserPostings, "search", broken)
    assert _hits(vectors, stored[0]) == {1, 2, 3}
    found = text.search("sailing", "ann", scope_keys=None, categories=None, k=5)
    assert {r for r, _ in found} == {1, 2, 3}
