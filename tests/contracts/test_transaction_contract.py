"""One write, one transaction: the contract a storage family keeps across its store and indexes.

The engine runs each write (row, vector, text, audit event) inside `store.transaction()` on its
writer thread and reads on other threads (memory/ports.py). A backend passes when a failed write
leaves no part of itself in the store or either index, a nested transaction joins the outer one,
and other threads see a write only once it has committed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from headroom.memory.models import MemoryFilter
from tests.contracts.backends import Storage
from tests.contracts.builders import axis, memory, put, run_in_threads

READ_TIMEOUT_S = 10.0


class Boom(Exception):
    pass


def write_everything(storage: Storage, content: str) -> str:
    """Row, event, setting, vector and text of one memory, as the engine writes them."""
    mem = memory(content)
    rid = storage.store.insert(mem)
    storage.vectors.add(rid, mem.user_id, mem.scope.key, mem.category, axis(0))
    storage.text.add(rid, mem.user_id, mem.scope.key, mem.category, mem.content)
    storage.store.record_event(mem.id, mem.user_id, "add")
    storage.store.set_setting("last_write", mem.id)
    return mem.id


def assert_nothing_of(storage: Storage, memory_id: str) -> None:
    assert storage.store.get(memory_id) is None
    assert storage.store.events(memory_id) == []
    assert storage.store.count(MemoryFilter(user_id="alice", include_superseded=True)) == 0
    assert storage.store.get_setting("last_write") is None
    assert storage.vectors.count("alice") == 0
    assert storage.text.count("alice") == 0
    assert storage.vectors.search(axis(0), "alice", scope_keys=None, categories=None, k=5) == []
    assert storage.text.search("rollback", "alice", scope_keys=None, categories=None, k=5) == []


def test_a_failed_write_leaves_no_trace_in_store_or_indexes(storage: Storage) -> None:
    written: list[str] = []
    with pytest.raises(Boom), storage.store.transaction():
        written.append(write_everything(storage, "rollback me"))
        raise Boom
    assert_nothing_of(storage, written[0])


def test_a_nested_transaction_joins_the_outer_one(storage: Storage) -> None:
    written: list[str] = []
    with pytest.raises(Boom), storage.store.transaction():
        with storage.store.transaction():
            written.append(write_everything(storage, "rollback me"))
        raise Boom  # after the inner block completed: the outer failure still undoes it
    assert_nothing_of(storage, written[0])


def test_a_committed_write_is_whole(storage: Storage) -> None:
    with storage.store.transaction():
        memory_id = write_everything(storage, "kept")
    assert storage.store.get(memory_id) is not None
    assert len(storage.store.events(memory_id)) == 1
    assert storage.store.get_setting("last_write") == memory_id
    assert (storage.vectors.count("alice"), storage.text.count("alice")) == (1, 1)


def test_the_store_stays_usable_after_a_rollback(storage: Storage) -> None:
    with pytest.raises(Boom), storage.store.transaction():
        write_everything(storage, "rollback me")
        raise Boom
    kept = memory("kept afterwards")
    rid = put(storage, kept)
    assert storage.store.get_by_rowids([rid])[rid].id == kept.id
    assert [r for r, _ in storage.text.search("kept", "alice", scope_keys=None,
                                              categories=None, k=5)] == [rid]


def test_other_threads_see_a_write_only_after_it_commits(storage: Storage) -> None:
    """The engine's readers run on their own threads while the writer's transaction is open."""
    reader = ThreadPoolExecutor(1, thread_name_prefix="contract-reader")

    def seen_elsewhere(memory_id: str) -> tuple[bool, int, int]:
        def look() -> tuple[bool, int, int]:
            return (
                storage.store.get(memory_id) is not None,
                storage.vectors.count("alice"),
                storage.text.count("alice"),
            )

        return reader.submit(look).result(timeout=READ_TIMEOUT_S)

    try:
        with storage.store.transaction():
            memory_id = write_everything(storage, "pending")
            assert seen_elsewhere(memory_id) == (False, 0, 0)
        assert seen_elsewhere(memory_id) == (True, 1, 1)
    finally:
        reader.shutdown(wait=True)


def test_concurrent_writers_do_not_lose_writes(storage: Storage) -> None:
    """Writes from several threads, each in its own transaction, all land (none overwritten)."""

    def write(n: int) -> None:
        for i in range(10):
            with storage.store.transaction():
                write_everything(storage, f"writer {n} item {i}")

    run_in_threads(write, 3)
    assert storage.store.count(MemoryFilter(user_id="alice", limit=None)) == 30
    assert (storage.vectors.count("alice"), storage.text.count("alice")) == (30, 30)


def test_a_failed_write_restores_what_it_removed(storage: Storage) -> None:
    """Supersede and forget take the old memory out of both indexes; if the write then fails,
    the memory must still be findable."""
    kept = memory("rollback keeps me")
    rid = put(storage, kept)
    with pytest.raises(Boom), storage.store.transaction():
        storage.vectors.remove([rid])
        storage.text.remove([rid])
        storage.store.save(replace(kept, valid_until=kept.created_at, forgotten_at=kept.created_at))
        raise Boom
    assert storage.store.get(kept.id) == kept
    assert (storage.vectors.count("alice"), storage.text.count("alice")) == (1, 1)
    hits = storage.vectors.search(axis(0), "alice", scope_keys=None, categories=None, k=5)
    assert [r for r, _ in hits] == [rid]
    text_hits = storage.text.search("rollback", "alice", scope_keys=None, categories=None, k=5)
    assert [r for r, _ in text_hits] == [rid]
