"""The per-user cache of common words (memory.common_words) and how recall uses it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from headroom.memory.common_words import CommonWords, frequent_words
from headroom.memory.hierarchical import HierarchicalMemory, MemoryDraft
from headroom.memory.models import MemoryFilter
from tests.fakes import record_submits

NOW = datetime(2024, 3, 15, 12, 0, tzinfo=UTC)


def test_frequent_words_counts_each_text_once_and_casefolds() -> None:
    texts = ["Nate: nate nate!", "NATE likes turtles", "Jo: turtles", "Jo: hi"]
    assert frequent_words(texts, 0.5) == {"nate", "turtles", "jo"}
    assert frequent_words(texts, 0.75) == set()
    assert frequent_words([], 0.3) == set()


class Loader:
    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.calls = 0

    def __call__(self, n: int) -> list[str]:
        self.calls += 1
        return self.texts[:n]


def test_cache_counts_again_only_when_the_user_has_changed_enough() -> None:
    cache = CommonWords(refresh=0.1)
    load = Loader(["Nate: a", "Nate: b", "Jo: c"])
    assert cache.get("u", 100, 0.5, load) == {"nate"}
    assert cache.get("u", 110, 0.5, load) == {"nate"}  # within 10 %: the cached answer
    assert load.calls == 1
    load.texts = ["Jo: a", "Jo: b", "Nate: c"]
    assert cache.get("u", 111, 0.5, load) == {"jo"}  # moved by more than 10 %: counted again
    assert cache.get("u", 111, 0.9, load) == set()  # another share is another entry
    assert load.calls == 3


def test_a_recently_checked_entry_is_used_without_a_count() -> None:
    now = [1000.0]
    cache = CommonWords(refresh=0.1, recheck_s=60.0, clock=lambda: now[0])
    load = Loader(["Nate: a", "Nate: b", "Jo: c"])
    assert cache.recent("u", 0.5) is None  # never counted
    assert cache.get("u", 100, 0.5, load) == {"nate"}
    now[0] += 59
    assert cache.recent("u", 0.5) == {"nate"}
    assert cache.recent("u", 0.9) is None  # another share, another entry
    now[0] += 2
    assert cache.recent("u", 0.5) is None  # checked too long ago: count again
    assert cache.get("u", 105, 0.5, load) == {"nate"}  # the count agrees: checked now
    assert load.calls == 1
    now[0] += 30
    assert cache.recent("u", 0.5) == {"nate"}


def test_cache_reads_a_bounded_sample_and_evicts_old_users() -> None:
    cache = CommonWords(max_users=2, sample=2)
    load = Loader(["x y", "x", "y", "y"])
    assert cache.get("a", 4, 1.0, load) == {"x"}  # only the newest two were read
    cache.get("b", 4, 1.0, load)
    cache.get("c", 4, 1.0, load)
    cache.get("a", 4, 1.0, load)  # "a" was evicted: read again
    assert load.calls == 4
    cache.forget("a")
    cache.get("a", 4, 1.0, load)
    assert load.calls == 5


async def test_purge_forgets_the_users_common_words(memory: HierarchicalMemory) -> None:
    drafts = [MemoryDraft(f"Nate: ok {i}", "nate", created_at=NOW - timedelta(days=i),
                          dedup=False) for i in range(25)]
    await memory.add_many(drafts)
    await memory.recall("What did Nate say?", "nate", now=NOW)
    assert memory._retrieval.common_words._entries
    await memory.purge("nate")
    assert not memory._retrieval.common_words._entries


async def test_store_reads_the_newest_current_contents_of_one_user(
    memory: HierarchicalMemory,
) -> None:
    await memory.add_many([
        MemoryDraft(f"fact {i}", "nate", created_at=NOW - timedelta(days=10 - i), dedup=False)
        for i in range(5)
    ])
    await memory.add("not his", "jo")
    old = (await memory.query(MemoryFilter(user_id="nate", limit=1)))[0]
    await memory.supersede(old.id, "fact 4, corrected")
    assert memory.store.recent_contents("nate", 3) == ["fact 4, corrected", "fact 3", "fact 2"]


async def test_writes_count_the_users_common_words_off_the_recall_path(
    memory: HierarchicalMemory,
) -> None:
    await memory.add_many([
        MemoryDraft(f"Nate: ok {i}", "nate", created_at=NOW - timedelta(days=i), dedup=False)
        for i in range(25)
    ])
    await memory._executors.write(lambda: None)  # the writer thread is FIFO: the refresh has run
    assert memory._retrieval.common_words.get("nate", 25, 0.3, lambda n: []) == {"nate", "ok"}


async def test_a_write_recounts_a_user_whose_entry_was_checked_just_now(
    memory: HierarchicalMemory,
) -> None:
    """The entry is trusted without a count for `recheck_s`, but not after this process wrote
    to the user: their next recall must see the new words."""
    await memory.add_many([
        MemoryDraft(f"Nate: ok {i}", "nate", created_at=NOW - timedelta(days=i), dedup=False)
        for i in range(25)
    ])
    await memory.recall("What did Nate say?", "nate", now=NOW)
    cache = memory._retrieval.common_words
    share = memory._retrieval.preset.common_share
    assert cache.recent("nate", share) == {"nate", "ok"}
    cache.get("nate", 25, 0.9, lambda n: ["x"])  # an entry of another preset's share
    await memory.add_many([
        MemoryDraft(f"Nate and Ivy: walk {i}", "nate", created_at=NOW - timedelta(hours=i),
                    dedup=False)
        for i in range(30)
    ])
    # The next recall, even one asked before the writer thread recounted, does not use the
    # words from before the write, whatever share it asks with.
    assert cache.recent("nate", share) != {"nate", "ok"}
    assert cache.recent("nate", 0.9) is None
    await memory._executors.write(lambda: None)  # the refresh after the write has run
    assert cache.recent("nate", share) == {"nate", "ok", "and", "ivy", "walk"}


async def test_writes_do_not_count_users_a_full_cache_would_evict_at_once(
    memory: HierarchicalMemory,
) -> None:
    cache = memory._retrieval.common_words
    share = memory._retrieval.preset.common_share
    for i in range(cache.max_users):
        cache.get(f"filler-{i}", 25, share, lambda n: ["filler words"])
    await memory.add_many([
        MemoryDraft(f"Nate: ok {i}", "nate", created_at=NOW - timedelta(days=i), dedup=False)
        for i in range(25)
    ])
    await memory._executors.write(lambda: None)  # the writer thread is FIFO: the refresh has run
    assert not cache.worth_counting("nate", share)
    # Recall still counts the user when it asks.
    assert memory._retrieval._user_common_words("nate", memory._retrieval.preset) == {"nate", "ok"}


async def test_forgets_expire_the_users_entry(memory: HierarchicalMemory) -> None:
    """Forgets change the count as adds do: a user left with fewer than `common_min_memories`
    has no common words at their next recall, not the words trusted from before."""
    added = await memory.add_many([
        MemoryDraft(f"Nate: ok {i}", "nate", created_at=NOW - timedelta(days=i), dedup=False)
        for i in range(25)
    ])
    retrieval = memory._retrieval
    await memory.recall("What did Nate say?", "nate", now=NOW)
    cache = retrieval.common_words
    share = retrieval.preset.common_share
    cache.expire(["someone else"])
    assert cache.recent("nate", share) == {"nate", "ok"}
    for m in added[:6]:
        await memory.forget(m.id, user_id="nate")
    await memory._executors.write(lambda: None)
    assert cache.recent("nate", share) == frozenset()  # counted again after the write: too few
    assert await retrieval.executors.read(
        lambda: retrieval._common_terms("What did Nate say?", "nate", retrieval.preset)
    ) == frozenset()


async def test_a_user_with_too_few_memories_costs_no_count_at_each_recall(
    memory: HierarchicalMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below `common_min_memories` (where every user starts) the answer "none" is remembered
    like a count: the next recalls read nothing for it. Once a write takes the user past the
    threshold, their words are counted."""
    retrieval = memory._retrieval
    share = retrieval.preset.common_share
    await memory.add_many([MemoryDraft(f"Nate: ok {i}", "nate", dedup=False) for i in range(5)])
    await memory.recall("What did Nate say?", "nate", now=NOW)
    assert retrieval.common_words.recent("nate", share) == frozenset()
    reads: list[str] = []
    record_submits(monkeypatch, memory._executors._readers, "read", reads)
    await memory.recall("What did Nate say?", "nate", now=NOW)
    assert len(reads) == 2  # BM25 and the ranking in one job, the core tier: no count
    monkeypatch.undo()
    await memory.add_many([
        MemoryDraft(f"Nate: ok {i}", "nate", created_at=NOW - timedelta(days=i), dedup=False)
        for i in range(5, 30)
    ])
    await memory._executors.write(lambda: None)  # the writer's recount after the write has run
    await memory.recall("What did Nate say?", "nate", now=NOW)
    assert retrieval.common_words.recent("nate", share) == {"nate", "ok"}


def test_a_small_user_never_pushes_a_counted_one_out() -> None:
    cache = CommonWords(max_users=2)
    cache.get("big", 500, 0.3, lambda n: ["ok ok ok"] * n)
    cache.too_few("small", 0.3)
    assert cache.recent("small", 0.3) == frozenset()
    cache.too_few("another small", 0.3)  # full: not kept, counted again when asked
    assert cache.recent("another small", 0.3) is None
    assert cache.recent("big", 0.3) == {"ok"}
