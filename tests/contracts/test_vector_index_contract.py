"""The `VectorIndex` contract, run over every storage family in tests/contracts/backends.py.

A backend passes when a search returns (rowid, cosine similarity) best first, confines itself to one
user's vectors and the asked scopes and categories *inside* the query (k results of this user even
when other users hold closer vectors), and when remove and count keep the index honest.
"""

from __future__ import annotations

import numpy as np
import pytest

from headroom.memory.errors import ConfigError
from headroom.memory.models import MemoryCategory, scope_key
from headroom.memory.ports import VectorIndex
from tests.contracts.backends import DIMENSION, Storage
from tests.contracts.builders import axis, blend, index_vector


def search(
    storage: Storage, vector: np.ndarray, user: str = "alice", *, k: int = 10,
    scope_keys: list[str] | None = None, categories: list[MemoryCategory] | None = None,
) -> list[tuple[int, float]]:
    return storage.vectors.search(vector, user, scope_keys=scope_keys, categories=categories, k=k)


def test_is_a_vector_index(vectors: VectorIndex) -> None:
    assert isinstance(vectors, VectorIndex)
    assert vectors.dimension == DIMENSION


def test_results_are_cosine_similarities_best_first(storage: Storage) -> None:
    index_vector(storage, 1, "alice", axis(0))
    index_vector(storage, 2, "alice", blend(1, 1))
    index_vector(storage, 3, "alice", axis(1))
    index_vector(storage, 4, "alice", axis(0, -1.0))
    index_vector(storage, 5, "alice", blend(3, 1))
    hits = search(storage, axis(0))
    assert [rid for rid, _ in hits] == [1, 5, 2, 3, 4]
    expected = [1.0, 3 / np.sqrt(10), 1 / np.sqrt(2), 0.0, -1.0]
    np.testing.assert_allclose([s for _, s in hits], expected, atol=1e-5)
    assert all(isinstance(rid, int) and isinstance(s, float) for rid, s in hits)


def test_similarity_ignores_vector_length(storage: Storage) -> None:
    index_vector(storage, 1, "alice", axis(2, 5.0))
    [(rid, similarity)] = search(storage, axis(2, 0.25))
    assert rid == 1
    assert similarity == pytest.approx(1.0, abs=1e-5)


def test_k_bounds_the_results(storage: Storage) -> None:
    for rid in range(1, 8):
        index_vector(storage, rid, "alice", blend(1, rid / 10))
    assert [rid for rid, _ in search(storage, axis(0), k=3)] == [1, 2, 3]
    assert len(search(storage, axis(0), k=100)) == 7
    assert search(storage, axis(0), k=0) == []


def test_a_user_never_sees_another_users_vectors_even_closer_ones(storage: Storage) -> None:
    # Bob holds exact matches; Alice's weaker ones must still fill her k, which only a
    # pre-filter inside the query guarantees (filtering a global top-k afterwards would not).
    for rid in range(100, 160):
        index_vector(storage, rid, "bob", axis(0))
    for rid in (1, 2, 3):
        index_vector(storage, rid, "alice", blend(1, rid))
    hits = search(storage, axis(0), k=3)
    assert sorted(rid for rid, _ in hits) == [1, 2, 3]
    assert search(storage, axis(0), "carol") == []
    assert {rid for rid, _ in search(storage, axis(0), "bob", k=100)} == set(range(100, 160))


def test_scope_keys_and_categories_are_pre_filters(storage: Storage) -> None:
    user_key = scope_key(None, None, None)
    s1, s2 = scope_key("s1", None, None), scope_key("s2", None, None)
    for rid in range(100, 140):  # close matches in a scope nobody asks for
        index_vector(storage, rid, "alice", axis(0), scope_key=s2)
    index_vector(storage, 1, "alice", blend(1, 1), scope_key=user_key)
    index_vector(storage, 2, "alice", blend(1, 2), scope_key=s1,
                 category=MemoryCategory.PREFERENCE)
    index_vector(storage, 3, "alice", blend(1, 3), scope_key=s1, category=MemoryCategory.DECISION)

    def found(**filters: object) -> set[int]:
        return {rid for rid, _ in search(storage, axis(0), k=3, **filters)}  # type: ignore[arg-type]

    assert found(scope_keys=[user_key, s1]) == {1, 2, 3}
    assert found(scope_keys=[s1]) == {2, 3}
    assert found(scope_keys=[user_key, s1], categories=[MemoryCategory.PREFERENCE]) == {2}
    assert found(
        scope_keys=[user_key, s1],
        categories=[MemoryCategory.PREFERENCE, MemoryCategory.DECISION],
    ) == {2, 3}
    everywhere = found(scope_keys=None)  # None: every scope, so the exact matches in s2 win
    assert len(everywhere) == 3 and everywhere <= set(range(100, 140))


def test_remove_is_idempotent_and_counts_follow(storage: Storage) -> None:
    for rid in (1, 2, 3):
        index_vector(storage, rid, "alice", axis(rid))
    index_vector(storage, 9, "bob", axis(0))
    assert (storage.vectors.count("alice"), storage.vectors.count("bob")) == (3, 1)
    assert storage.vectors.count() == 4
    with storage.store.transaction():
        storage.vectors.remove([2, 404])
        storage.vectors.remove([2])
        storage.vectors.remove([])
    assert storage.vectors.count("alice") == 2
    assert storage.vectors.count() == 3
    assert storage.vectors.count("carol") == 0
    assert 2 not in {rid for rid, _ in search(storage, axis(2))}


def test_a_removed_rowid_can_be_indexed_again(storage: Storage) -> None:
    """The engine re-indexes a memory whose scope changed (remove, then add the same rowid)."""
    index_vector(storage, 1, "alice", axis(0), scope_key=scope_key("s1", None, None))
    with storage.store.transaction():
        storage.vectors.remove([1])
        storage.vectors.add(1, "alice", scope_key(None, None, None), MemoryCategory.FACT, axis(1))
    [(rid, similarity)] = search(storage, axis(1), scope_keys=[scope_key(None, None, None)])
    assert (rid, round(similarity, 5)) == (1, 1.0)
    assert storage.vectors.count("alice") == 1


def test_a_vector_of_the_wrong_dimension_is_refused(storage: Storage) -> None:
    with pytest.raises(ConfigError, match="dimension"), storage.store.transaction():
        storage.vectors.add(
            1, "alice", scope_key(None, None, None), MemoryCategory.FACT,
            np.ones(DIMENSION + 1, dtype=np.float32),
        )
    assert storage.vectors.count() == 0


def test_searches_follow_adds_and_removes_between_them(storage: Storage) -> None:
    """A search after a write sees it: an adapter that keeps a user's vectors in memory
    (SQLite's per-process copy) must bring them up to date, never answer from before."""
    for rid in range(1, 6):
        index_vector(storage, rid, "alice", blend(1, rid / 10))
    assert search(storage, axis(0), k=1)[0][0] == 1
    index_vector(storage, 9, "alice", axis(0))
    assert search(storage, axis(0), k=1)[0][0] == 9
    with storage.store.transaction():
        storage.vectors.remove([9, 1])
    assert [rid for rid, _ in search(storage, axis(0))] == [2, 3, 4, 5]
    with storage.store.transaction():
        storage.vectors.remove([2, 3, 4, 5])
    assert search(storage, axis(0)) == []
    index_vector(storage, 2, "alice", axis(1))  # a row key used again, for another vector
    [(rid, similarity)] = search(storage, axis(1))
    assert rid == 2 and similarity == pytest.approx(1.0, abs=1e-5)
