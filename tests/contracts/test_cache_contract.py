"""The `MemoryCache` contract, run over every cache in tests/contracts/backends.py.

A cache passes when it gives back what was put (as the caller's own copy, in both directions),
forgets on invalidate and clear, never holds more than its capacity, keeps the recently used, and
stays consistent when reader threads share it.
"""

from __future__ import annotations

from collections.abc import Callable

from headroom.memory.ports import MemoryCache
from tests.contracts.builders import memory, run_in_threads

MakeCache = Callable[[int], MemoryCache]


def test_is_a_memory_cache(make_cache: MakeCache) -> None:
    assert isinstance(make_cache(10), MemoryCache)


def test_put_then_get(make_cache: MakeCache) -> None:
    cache = make_cache(10)
    mem = memory("cached", metadata={"k": [1]})
    assert cache.get(mem.id) is None
    cache.put(mem)
    assert cache.get(mem.id) == mem
    assert len(cache) == 1


def test_a_second_put_replaces_the_first(make_cache: MakeCache) -> None:
    cache = make_cache(10)
    mem = memory("v1")
    cache.put(mem)
    mem.importance = 0.9
    cache.put(mem)
    got = cache.get(mem.id)
    assert got is not None and got.importance == 0.9
    assert len(cache) == 1


def test_neither_side_can_change_what_others_read(make_cache: MakeCache) -> None:
    cache = make_cache(10)
    mem = memory("cached", metadata={"k": 1}, entity_refs=["a"])
    cache.put(mem)
    mem.metadata["k"] = 2  # the caller keeps using its object after put
    got = cache.get(mem.id)
    assert got is not None and got.metadata == {"k": 1}
    got.entity_refs.append("b")  # a reader mutating its result
    again = cache.get(mem.id)
    assert again is not None and again.entity_refs == ["a"]


def test_invalidate_and_clear(make_cache: MakeCache) -> None:
    cache = make_cache(10)
    a, b, c = memory("a"), memory("b"), memory("c")
    for mem in (a, b, c):
        cache.put(mem)
    cache.invalidate(a.id)
    cache.invalidate(a.id)
    cache.invalidate("never-cached")
    assert cache.get(a.id) is None
    assert cache.get(b.id) == b
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0
    assert cache.get(b.id) is None and cache.get(c.id) is None


def test_capacity_bounds_the_size_and_the_recently_used_stay(make_cache: MakeCache) -> None:
    cache = make_cache(3)
    mems = [memory(f"m{i}") for i in range(6)]
    for mem in mems[:3]:
        cache.put(mem)
    assert cache.get(mems[0].id) == mems[0]  # now m1 is the least recently used
    for mem in mems[3:5]:
        cache.put(mem)
    assert len(cache) == 3
    assert cache.get(mems[0].id) == mems[0]
    assert cache.get(mems[4].id) == mems[4]
    assert cache.get(mems[1].id) is None and cache.get(mems[2].id) is None


def test_capacity_zero_caches_nothing(make_cache: MakeCache) -> None:
    cache = make_cache(0)
    mem = memory("x")
    cache.put(mem)
    assert cache.get(mem.id) is None
    assert len(cache) == 0


def test_threads_sharing_the_cache_keep_it_consistent(make_cache: MakeCache) -> None:
    cache = make_cache(16)
    mems = [memory(f"m{i}") for i in range(40)]
    def work(offset: int) -> None:
        for round_ in range(25):
            mem = mems[(offset + round_) % len(mems)]
            cache.put(mem)
            got = cache.get(mem.id)
            assert got is None or got == mem
            cache.invalidate(mems[(offset * 7 + round_) % len(mems)].id)

    run_in_threads(work, 4, timeout_s=30)
    assert len(cache) <= 16
