"""A removed row leaves no trace in a process's in-memory index copies: its floats, sign bits,
row key and labels are zeroed, and its text postings (and terms no live row holds) dropped,
whether this process removed it or a copy replayed the removal."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from headroom.memory.adapters.cached_text import Fts5Words, UserPostings
from headroom.memory.adapters.cached_vectors import UserVectors
from headroom.memory.adapters.index_log import ADD, REMOVE
from headroom.memory.models import MemoryCategory

pytestmark = pytest.mark.sqlite_only("the in-memory copies serve the SQLite indexes")

DIM = 64


class _Rows:
    """A connection stand-in answering the replay's reads of added rows."""

    def __init__(self, vectors: dict[int, np.ndarray] | None = None,
                 texts: dict[int, str] | None = None) -> None:
        self.vectors, self.texts = vectors or {}, texts or {}

    def execute(self, sql: str, params: list[int]) -> _Rows:
        self._found = [(r, self.texts[r], "s", "fact") for r in params if r in self.texts] \
            if "memories_fts" in sql else \
            [(r, "s", "fact", self.vectors[r].tobytes()) for r in params if r in self.vectors
             and "memory_vectors_compact" in sql]
        return self

    def fetchall(self) -> list[tuple]:
        return self._found

    def fetchone(self) -> None:
        return None


def _vectors(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


@pytest.mark.parametrize("bits_from", [1, 10_000])  # sign bits in use, exact only
def test_a_removed_rows_vector_and_sign_bits_are_zeroed(bits_from: int) -> None:
    v = _vectors(300)
    copy = UserVectors(DIM, 1, [(i + 1, "s", "fact", v[i].tobytes()) for i in range(300)],
                       bits_from=bits_from, min_candidates=50)
    query = v[41]
    assert copy.search(query, scope_keys=None, categories=None, k=3)[0][0] == 42
    copy.replay(_Rows(), [(2, REMOVE, 42)])
    slot = 41
    assert not copy.matrix[slot].any() and not copy.words[:, slot].any()
    assert copy.rowids[slot] == 0
    got = copy.search(query, scope_keys=None, categories=None, k=3)
    assert 42 not in {r for r, _ in got}
    rest = copy.matrix[:300][np.arange(300) != slot]
    assert np.count_nonzero(np.abs(rest).sum(axis=1)) == 299  # the others are all kept


def test_a_removal_during_a_search_is_zeroed_when_that_search_ends() -> None:
    v = _vectors(50)
    copy = UserVectors(DIM, 1, [(i + 1, "s", "fact", v[i].tobytes()) for i in range(50)])
    copy._readers += 1  # a search that read the arrays before the removal, still running
    copy.replay(_Rows(), [(2, REMOVE, 7)])
    assert copy.matrix[6].any()  # not under that search's feet
    copy._readers -= 1
    copy.search(v[0], scope_keys=None, categories=None, k=1)  # the next search's end scrubs
    assert not copy.matrix[6].any() and copy.rowids[6] == 0


def test_a_replayed_add_then_remove_leaves_the_added_vector_nowhere() -> None:
    v = _vectors(21)
    copy = UserVectors(DIM, 1, [(i + 1, "s", "fact", v[i].tobytes()) for i in range(20)],
                       bits_from=1, min_candidates=5)
    copy.search(v[0], scope_keys=None, categories=None, k=1)  # sign bits built
    copy.replay(_Rows({21: v[20]}), [(2, ADD, 21)])
    copy.search(v[0], scope_keys=None, categories=None, k=1)  # the new row's bits built
    copy.replay(_Rows(), [(3, REMOVE, 21)])
    unit = v[20] / np.linalg.norm(v[20])
    assert not np.isclose(copy.matrix, unit).all(axis=1).any()
    assert not copy.words[:, 20].any()


_TEXTS = ["alice runs marathons", "bob likes zucchini bread", "alice likes bread",
          "zucchini zucchini secretword"]


def _postings() -> UserPostings:
    docs = [(i + 1, t, "s", "fact") for i, t in enumerate(_TEXTS)]
    return UserPostings(Fts5Words("unicode61"), 1, 1, docs)


def _hits(copy: UserPostings, term: str) -> list[int]:
    stats = (len(_TEXTS), 4.0, [1])
    return [r for r, _ in copy.search([term], stats, scope_keys=None, categories=None, k=10)]


def test_a_removed_rows_postings_and_its_own_terms_are_dropped() -> None:
    copy = _postings()
    assert _hits(copy, "secretword") == [4] and _hits(copy, "zucchini") == [4, 2]
    copy.replay(_Rows(), [(2, REMOVE, 4)])
    assert "secretword" not in copy.postings and "secretword" not in copy._term_no
    assert "secretword" not in [t for t in copy._terms if t]
    assert 3 not in copy.postings["zucchini"][0].tolist()  # position 3 was row 4's
    assert _hits(copy, "zucchini") == [2] and _hits(copy, "secretword") == []
    assert copy.rowids[3] == 0 and copy.lengths[3] == 0.0


def test_a_replayed_texts_postings_go_with_its_removal() -> None:
    copy = _postings()
    copy.replay(_Rows(texts={9: "hushhush alice"}), [(2, ADD, 9)])
    assert _hits(copy, "hushhush") == [9]
    copy.replay(_Rows(), [(3, REMOVE, 9)])
    assert "hushhush" not in copy.postings and "hushhush" not in copy.tails
    assert 4 not in np.concatenate(
        [copy.postings["alice"][0], *(p[0] for p in copy.tails.get("alice", []))]).tolist()
    assert sorted(_hits(copy, "alice")) == [1, 3]


def test_searches_beside_removals_never_return_a_removed_or_zeroed_row() -> None:
    v = _vectors(400)
    copy = UserVectors(DIM, 1, [(i + 1, "s", "fact", v[i].tobytes()) for i in range(400)],
                       bits_from=1, min_candidates=50)
    bad: list[int] = []

    def search() -> None:
        for i in range(200):
            for rid, _ in copy.search(v[i], scope_keys=None, categories=[MemoryCategory.FACT],
                                      k=5):
                if rid == 0:
                    bad.append(rid)

    t = threading.Thread(target=search)
    t.start()
    for seq, rid in enumerate(range(1, 200), start=2):
        with copy.lock:
            copy.replay(_Rows(), [(seq, REMOVE, rid)])
    t.join()
    assert bad == []
