"""The `TextIndex` contract, run over every storage family in tests/contracts/backends.py.

A backend passes when a search ranks by BM25-like relevance (higher is better, more shared words
and rarer words first), reads query text as words and never as query syntax, confines itself to one
user and the asked scopes and categories inside the query, and when remove, count and optimize keep
the index honest. Stemming and stop words are a backend's own business and are not tested here.
"""

from __future__ import annotations

import pytest

from headroom.memory.models import MemoryCategory, scope_key
from headroom.memory.ports import TextIndex
from tests.contracts.backends import Storage
from tests.contracts.builders import index_text

CORPUS = {
    1: "quick brown fox jumps",
    2: "lazy dog sleeps today",
    3: "quick dog runs fast",
    4: "cat naps quietly inside",
}


def search(
    storage: Storage, query: str, user: str = "alice", *, k: int = 10,
    scope_keys: list[str] | None = None, categories: list[MemoryCategory] | None = None,
) -> list[tuple[int, float]]:
    return storage.text.search(query, user, scope_keys=scope_keys, categories=categories, k=k)


def rowids(hits: list[tuple[int, float]]) -> list[int]:
    return [rid for rid, _ in hits]


@pytest.fixture
def corpus(storage: Storage) -> Storage:
    for rid, content in CORPUS.items():
        index_text(storage, rid, "alice", content)
    return storage


def test_is_a_text_index(text: TextIndex) -> None:
    assert isinstance(text, TextIndex)


def test_more_shared_words_rank_higher(corpus: Storage) -> None:
    hits = search(corpus, "quick dog")
    assert rowids(hits)[0] == 3
    assert set(rowids(hits)) == {1, 2, 3}  # a document sharing no word is not a hit
    scores = [score for _, score in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(isinstance(s, float) and s > 0 for s in scores)
    assert scores[0] > scores[1]


def test_a_rarer_word_weighs_more(corpus: Storage) -> None:
    # "fox" is in one document, "dog" in two: the fox document wins a one-word tie.
    scores = dict(search(corpus, "fox dog"))
    assert set(scores) == {1, 2, 3}
    assert scores[1] > scores[2] and scores[1] > scores[3]


def test_case_and_punctuation_do_not_matter(corpus: Storage) -> None:
    assert rowids(search(corpus, "QUICK, Dog?!")) == rowids(search(corpus, "quick dog"))


@pytest.mark.parametrize(
    "query",
    [
        'fox" OR (dog',
        "content:fox",
        "user_key:nobody fox",
        "NEAR(fox dog)",
        "fox*",
        "-fox",
        "fox AND",
        "^fox",
        "fox'; DROP TABLE memories; --",
    ],
)
def test_query_text_is_words_never_syntax(corpus: Storage, query: str) -> None:
    index_text(corpus, 50, "bob", "quick brown fox of bob")
    hits = rowids(search(corpus, query))
    assert 1 in hits  # the word "fox" still finds its document
    assert 50 not in hits


@pytest.mark.parametrize("query", ["", "   ", "?!.,", '"', "()"])
def test_a_query_without_words_finds_nothing(corpus: Storage, query: str) -> None:
    assert search(corpus, query) == []


def test_k_bounds_the_results(corpus: Storage) -> None:
    assert len(search(corpus, "quick dog fox cat", k=2)) == 2
    assert search(corpus, "quick", k=0) == []


def test_non_ascii_words_are_found(storage: Storage) -> None:
    index_text(storage, 1, "alice", "Lives in 東京 near a café")
    index_text(storage, 2, "alice", "Lives in Paris")
    assert rowids(search(storage, "東京")) == [1]
    assert rowids(search(storage, "café")) == [1]


def test_a_user_never_sees_another_users_documents(corpus: Storage) -> None:
    # Bob's many exact matches must not crowd Alice's out of her k.
    for rid in range(100, 160):
        index_text(corpus, rid, "bob", "quick dog quick dog")
    hits = rowids(search(corpus, "quick dog", k=3))
    assert sorted(hits) == [1, 2, 3]
    assert search(corpus, "quick dog", "carol") == []
    assert set(rowids(search(corpus, "quick", "bob", k=100))) == set(range(100, 160))


def test_scope_keys_and_categories_are_pre_filters(storage: Storage) -> None:
    user_key = scope_key(None, None, None)
    s1, s2 = scope_key("s1", None, None), scope_key("s2", None, None)
    for rid in range(100, 140):
        index_text(storage, rid, "alice", "espresso espresso espresso", scope_key=s2)
    index_text(storage, 1, "alice", "espresso at home", scope_key=user_key)
    index_text(storage, 2, "alice", "espresso at work", scope_key=s1,
               category=MemoryCategory.PREFERENCE)
    index_text(storage, 3, "alice", "espresso on trips", scope_key=s1,
               category=MemoryCategory.DECISION)

    def found(**filters: object) -> set[int]:
        return set(rowids(search(storage, "espresso", k=3, **filters)))  # type: ignore[arg-type]

    assert found(scope_keys=[user_key, s1]) == {1, 2, 3}
    assert found(scope_keys=[s1]) == {2, 3}
    assert found(scope_keys=[user_key, s1], categories=[MemoryCategory.PREFERENCE]) == {2}
    everywhere = found(scope_keys=None)
    assert len(everywhere) == 3


def test_remove_is_idempotent_and_counts_follow(corpus: Storage) -> None:
    index_text(corpus, 9, "bob", "quick dog")
    assert (corpus.text.count("alice"), corpus.text.count("bob"), corpus.text.count()) == (4, 1, 5)
    with corpus.store.transaction():
        corpus.text.remove([3, 404])
        corpus.text.remove([3])
        corpus.text.remove([])
    assert (corpus.text.count("alice"), corpus.text.count()) == (3, 4)
    assert corpus.text.count("carol") == 0
    assert 3 not in rowids(search(corpus, "quick dog"))


def test_a_removed_rowid_can_be_indexed_again(corpus: Storage) -> None:
    with corpus.store.transaction():
        corpus.text.remove([1])
        corpus.text.add(1, "alice", scope_key(None, None, None), MemoryCategory.FACT,
                        "slow green turtle")
    assert rowids(search(corpus, "turtle")) == [1]
    assert rowids(search(corpus, "fox")) == []


def test_optimize_keeps_every_result(corpus: Storage) -> None:
    for rid in range(10, 60):  # many small writes, the case optimize is for
        index_text(corpus, rid, "alice", f"note number {rid} about a quick dog")
    with corpus.store.transaction():
        corpus.text.remove(list(range(10, 30)))
    before = search(corpus, "quick dog fox", k=100)
    with corpus.store.transaction():
        corpus.text.optimize()
    after = search(corpus, "quick dog fox", k=100)
    assert dict(after) == pytest.approx(dict(before))  # ties may come back in another order
    assert len(after) == 3 + 30
    assert corpus.text.count("alice") == 4 + 30


def test_searches_follow_adds_and_removes_between_them(storage: Storage) -> None:
    """A search after a write sees it: an adapter that keeps a user's postings in memory
    (SQLite's per-process copy) must bring them up to date, never answer from before."""
    index_text(storage, 1, "alice", "hiking boots for the alps")
    index_text(storage, 2, "alice", "a hiking trip with friends")
    assert {rid for rid, _ in search(storage, "hiking")} == {1, 2}
    index_text(storage, 3, "alice", "hiking hiking hiking")
    assert search(storage, "hiking")[0][0] == 3
    with storage.store.transaction():
        storage.text.remove([3, 1])
    assert [rid for rid, _ in search(storage, "hiking")] == [2]
    with storage.store.transaction():
        storage.text.remove([2])
    assert search(storage, "hiking") == []
    index_text(storage, 2, "alice", "kayaks only")  # a row key used again, for other words
    assert search(storage, "hiking") == [] and [r for r, _ in search(storage, "kayaks")] == [2]
