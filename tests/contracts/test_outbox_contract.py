"""The `Outbox` contract, run over every implementation: the SQLite outbox and the in-memory fake.

A backend passes when a row is held by one owner at a time, a lapsed lease re-offers it, removing
it commits or rolls back with the store's transaction, and rows that keep failing are parked as dead
letters that can be re-driven.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

from headroom.memory.adapters import SQLiteMemoryStore, SQLiteOutbox
from headroom.memory.db import Database
from headroom.memory.ports import Outbox
from tests.fake_outbox import InMemoryOutbox


class ManualClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    outbox: Outbox
    transaction: Callable[[], AbstractContextManager[None]]
    clock: ManualClock


@pytest.fixture(params=["sqlite", "in-memory", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    clock = ManualClock()
    if request.param == "sqlite":
        db = Database(tmp_path / "outbox.db")
        store = SQLiteMemoryStore(db)
        yield Backend(SQLiteOutbox(db, clock=clock), store.transaction, clock)
        db.close()
    elif request.param == "postgres":  # tests/pg.py's server, a fresh schema
        from headroom.memory.adapters.postgres import PostgresOutbox, open_database

        pg = open_database(request.getfixturevalue("pg_schema_url"), pool_size=8)
        yield Backend(PostgresOutbox(pg, clock=clock), pg.transaction, clock)
        pg.close()
    else:
        fake = InMemoryOutbox(clock=clock)
        yield Backend(fake, fake.transaction, clock)


def payload(user: str, n: int) -> dict[str, object]:
    return {"scope": {"user_id": user}, "ops": {"add": [f"fact {n}"]}, "request_id": f"r{n}"}


def test_is_an_outbox(backend: Backend) -> None:
    assert isinstance(backend.outbox, Outbox)


def test_claim_hands_out_rows_oldest_first_with_their_payload(backend: Backend) -> None:
    box = backend.outbox
    ids = [box.put(payload("ann", n)) for n in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert box.size() == 5
    claimed = box.claim(3, "w1", lease_s=30)
    assert [c[0] for c in claimed] == ids[:3]
    assert claimed[0][1] == payload("ann", 0)
    assert [c[2] for c in claimed] == [0, 0, 0]
    assert box.size() == 5  # claimed rows are still queued until completed


def test_a_leased_row_is_not_offered_to_another_owner(backend: Backend) -> None:
    box = backend.outbox
    ids = [box.put(payload("ann", n)) for n in range(4)]
    first = box.claim(2, "w1", lease_s=30)
    second = box.claim(10, "w2", lease_s=30)
    assert [c[0] for c in first] == ids[:2]
    assert [c[0] for c in second] == ids[2:]
    assert box.claim(10, "w3", lease_s=30) == []


def test_claims_are_exclusive_across_threads(backend: Backend) -> None:
    box = backend.outbox
    ids = {box.put(payload("ann", n)) for n in range(200)}
    taken: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def work(owner: str) -> None:
        mine: list[int] = []
        try:
            while rows := box.claim(3, owner, lease_s=300):
                for oid, _, _ in rows:
                    mine.append(oid)
                    with backend.transaction():
                        assert box.complete(oid, owner)
        except BaseException as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)
        taken[owner] = mine

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    every = [oid for mine in taken.values() for oid in mine]
    assert len(every) == len(set(every))  # no row applied twice
    assert set(every) == ids
    assert box.size() == 0


def test_a_lapsed_lease_re_offers_the_row_and_the_old_owner_loses_it(backend: Backend) -> None:
    box = backend.outbox
    oid = box.put(payload("ann", 1))
    assert [c[0] for c in box.claim(1, "slow", lease_s=10)] == [oid]
    backend.clock.now += 9
    assert box.claim(1, "other", lease_s=10) == []
    backend.clock.now += 2
    assert [c[0] for c in box.claim(1, "other", lease_s=10)] == [oid]
    assert box.complete(oid, "slow") is False  # its lease ran out: the caller rolls back
    assert box.complete(oid, "other") is True
    assert box.size() == 0


def test_complete_by_a_stranger_leaves_the_row(backend: Backend) -> None:
    box = backend.outbox
    oid = box.put(payload("ann", 1))
    box.claim(1, "w1", lease_s=30)
    assert box.complete(oid, "w2") is False
    assert box.complete(oid + 1000, "w1") is False
    assert box.size() == 1


def test_complete_rolls_back_with_the_store_transaction(backend: Backend) -> None:
    box = backend.outbox
    oid = box.put(payload("ann", 1))
    box.claim(1, "w1", lease_s=30)
    with pytest.raises(RuntimeError), backend.transaction():
        assert box.complete(oid, "w1") is True
        raise RuntimeError("the apply failed after the delete")
    assert box.size() == 1
    backend.clock.now += 31
    assert [c[0] for c in box.claim(1, "w2", lease_s=30)] == [oid]
    with backend.transaction():
        assert box.complete(oid, "w2") is True
    assert box.size() == 0


def test_fail_counts_the_attempt_and_releases_the_row(backend: Backend) -> None:
    box = backend.outbox
    oid = box.put(payload("ann", 1))
    box.claim(1, "w1", lease_s=30)
    assert box.fail(oid, "w2", "not yours") is False
    assert box.fail(oid, "w1", "embedder down") is True
    again = box.claim(1, "w2", lease_s=30)
    assert [(c[0], c[2]) for c in again] == [(oid, 1)]
    assert box.fail(oid, "w2", "embedder down", retry_after_s=5) is True
    assert box.claim(1, "w3", lease_s=30) == []  # held back for its retry delay
    backend.clock.now += 5
    assert [(c[0], c[2]) for c in box.claim(1, "w3", lease_s=30)] == [(oid, 2)]


def test_a_dead_letter_keeps_its_payload_and_error_and_stops_blocking(backend: Backend) -> None:
    box = backend.outbox
    poison = box.put(payload("eve", 0))
    after = box.put(payload("bob", 1))
    box.claim(1, "w1", lease_s=30)
    box.fail(poison, "w1", "cannot embed")
    assert box.dead_letter(poison, "cannot embed: TextEncodeInput") is True
    assert box.dead_letter(poison, "again") is False
    assert (box.size(), box.dead_count()) == (1, 1)
    assert [c[0] for c in box.claim(5, "w2", lease_s=30)] == [after]
    [letter] = box.dead_letters()
    assert letter.outbox_id == poison
    assert letter.user_id == "eve"
    assert letter.payload == payload("eve", 0)
    assert letter.error == "cannot embed: TextEncodeInput"
    assert letter.attempts == 2  # the failed attempt plus the one that parked it
    assert letter.dead_at >= letter.created_at


def test_dead_letter_rolls_back_with_the_store_transaction(backend: Backend) -> None:
    box = backend.outbox
    oid = box.put(payload("eve", 0))
    with pytest.raises(RuntimeError), backend.transaction():
        box.dead_letter(oid, "boom")
        raise RuntimeError
    assert (box.size(), box.dead_count()) == (1, 0)


def test_redrive_queues_dead_letters_again_at_the_tail(backend: Backend) -> None:
    box = backend.outbox
    first, second, third = (box.put(payload("eve", n)) for n in range(3))
    box.dead_letter(first, "e1")
    box.dead_letter(second, "e2")
    letters = box.dead_letters()
    assert [d.outbox_id for d in letters] == [first, second]
    assert box.dead_letters(limit=1) == letters[:1]
    assert box.redrive([letters[1].id, 999_999]) == 1
    assert (box.size(), box.dead_count()) == (2, 1)
    assert box.redrive() == 1
    assert (box.size(), box.dead_count()) == (3, 0)
    rows = box.claim(10, "w1", lease_s=30)
    assert rows[0][0] == third  # re-driven rows queue behind what was already waiting
    assert [r[1] for r in rows[1:]] == [payload("eve", 1), payload("eve", 0)]
    assert all(r[2] == 0 for r in rows)
    assert box.redrive() == 0


_WORKER = textwrap.dedent(
    """
    import os, sys, time
    from headroom.memory.adapters import SQLiteOutbox
    from headroom.memory.db import Database

    box = SQLiteOutbox(Database(sys.argv[1]))
    owner, go = sys.argv[2], sys.argv[3]
    print("ready", flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    while rows := box.claim(2, owner, lease_s=300):
        for oid, _, _ in rows:
            with box.db.transaction():
                if box.complete(oid, owner):
                    print(oid, flush=True)
    """
)


def test_two_processes_on_one_file_never_take_the_same_row(tmp_path: Path) -> None:
    path, go = tmp_path / "shared.db", tmp_path / "go"
    db = Database(path)
    box = SQLiteOutbox(db)
    with db.transaction():
        ids = {box.put(payload("ann", n)) for n in range(1000)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(path), f"proc{i}", str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    for p in procs:  # both are up before either starts claiming, so they really compete
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    every = [int(line) for out, _ in outputs for line in out.split()]
    assert len(every) == len(set(every))
    assert set(every) == ids
    assert box.size() == 0
    db.close()
