"""Many replicas, one PostgreSQL: a shared outbox is applied exactly once, a fact written through
one engine is recalled through another, and a replica killed holding claimed rows loses nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from headroom.memory.adapters.postgres import (
    PgNotifyCache,
    PostgresMemoryStore,
    PostgresOutbox,
    open_database,
    open_postgres,
)
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import AddOp, Memory, MemoryConfig, MemoryFilter, MemoryOps, Scope
from tests.fakes import FakeEmbedder
from tests.pg import pg_database, pg_schema_url, pg_server  # noqa: F401 (fixtures)

DIMENSION = 32
DRAIN_S = 60.0



async def open_engine(url: str, tmp_path: Path) -> HierarchicalMemory:
    family = await asyncio.to_thread(open_postgres, url, DIMENSION, pool_size=6)
    return HierarchicalMemory(
        family.store, family.vectors, family.text, FakeEmbedder(DIMENSION),
        PgNotifyCache(family.db, 100),
        config=MemoryConfig(db_path=tmp_path / "unused.db"), on_close=family.close,
        outbox=family.outbox,
    )


@pytest.fixture
async def replicas(
    pg_schema_url: str, tmp_path: Path,  # noqa: F811
) -> AsyncIterator[list[HierarchicalMemory]]:
    engines = [await open_engine(pg_schema_url, tmp_path) for _ in range(3)]
    try:
        yield engines
    finally:
        for engine in engines:
            await engine.close(drain_timeout=DRAIN_S)


def ops(*texts: str) -> MemoryOps:
    return MemoryOps(add=tuple(AddOp(text=t) for t in texts))


async def test_a_shared_outbox_is_applied_exactly_once(
    replicas: list[HierarchicalMemory],
) -> None:
    first = replicas[0]
    texts = [f"Fact number {n} about user {n % 4}" for n in range(120)]
    for n, text in enumerate(texts):  # queued before any worker runs: all of them compete
        await first.submit(ops(text), Scope(f"user{n % 4}"), request_id=f"r{n}")
    await asyncio.gather(*(engine.start() for engine in replicas))
    await asyncio.gather(*(engine.drain(DRAIN_S) for engine in replicas))

    applied = [engine.writer_stats()["applied"] for engine in replicas]
    assert sum(applied) == len(texts)  # every op applied once, by exactly one replica
    stored: list[str] = []
    for user in range(4):
        stored += [m.content for m in await first.query(
            MemoryFilter(user_id=f"user{user}", limit=None, include_superseded=True)
        )]
    assert sorted(stored) == sorted(texts)
    assert (await first.health())["outbox_pending"] == 0


async def test_a_fact_written_through_one_replica_is_recalled_through_another(
    replicas: list[HierarchicalMemory],
) -> None:
    writer, reader, third = replicas
    added = await writer.add("Allergic to peanuts and shellfish", "ann")
    await writer.add("Plays the cello on weekends", "bob")
    hits = await reader.search("peanuts allergy", "ann", top_k=5)
    assert [h.memory.id for h in hits][:1] == [added.id]
    assert all(h.memory.user_id == "ann" for h in hits)
    # A change through the third replica is what the others read next: no stale cache entry.
    assert (await reader.get(added.id)) is not None
    newer = await third.supersede(added.id, "Allergic to peanuts only")
    assert [m.id for m in await reader.query(MemoryFilter(user_id="ann"))] == [newer.id]
    await third.forget(newer.id, user_id="ann")
    assert await writer.query(MemoryFilter(user_id="ann")) == []
    assert await reader.search("peanuts", "ann") == []


async def test_no_replica_serves_a_cached_copy_another_replica_changed(
    replicas: list[HierarchicalMemory],
) -> None:
    one, two, _ = replicas
    fact = await one.add("Lives in Paris", "ann")
    assert (await two.get(fact.id)).is_current  # now cached on `two`
    assert (await two.get(fact.id)).is_current
    await one.supersede(fact.id, "Lives in Rome")
    deadline = time.monotonic() + 5  # the notice travels asynchronously
    while (await two.get(fact.id)).is_current and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not (await two.get(fact.id)).is_current
    newer = (await two.query(MemoryFilter(user_id="ann")))[0]
    assert (await two.get(newer.id)).content == "Lives in Rome"
    await one.forget(newer.id, user_id="ann")
    deadline = time.monotonic() + 5
    while (await two.get(newer.id)).is_current and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert (await two.get(newer.id)).forgotten_at is not None


def test_writers_of_one_user_on_two_replicas_see_each_others_rows(pg_schema_url: str) -> None:  # noqa: F811
    """Check-then-insert (dedup, per-user limits) stays true across replicas: the second
    writer's check waits for the first writer's commit and then sees its row."""
    first_db, second_db = (open_database(pg_schema_url, pool_size=2) for _ in range(2))
    first, second = PostgresMemoryStore(first_db), PostgresMemoryStore(second_db)
    checked, found = threading.Event(), []

    def write_first() -> None:
        with first.transaction():
            assert first.find_current_by_content("ann", "Owns a boat") is None
            checked.set()
            time.sleep(0.5)  # the other replica checks meanwhile
            first.insert(Memory(content="Owns a boat", user_id="ann"))

    def write_second() -> None:
        assert checked.wait(timeout=30)
        with second.transaction():
            found.append(second.find_current_by_content("ann", "owns a boat."))
            # Another user's writer never waits for ann's.
            assert second.find_current_by_content("bob", "Owns a boat") is None

    threads = [threading.Thread(target=write_first), threading.Thread(target=write_second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(found) == 1 and found[0] is not None and found[0].content == "Owns a boat"
    first_db.close()
    second_db.close()


_CLAIMER = textwrap.dedent(
    """
    import sys, time
    from headroom.memory.adapters.postgres import PostgresOutbox, open_database

    db = open_database(sys.argv[1], pool_size=2)
    box = PostgresOutbox(db)
    owner, mode = sys.argv[2], sys.argv[3]
    print("ready", flush=True)
    sys.stdin.readline()  # go
    if mode == "hold":  # claim and die before applying: the parent SIGKILLs us
        print(len(box.claim(50, owner, lease_s=1.0)), flush=True)
        time.sleep(600)
    while rows := box.claim(5, owner, lease_s=30.0):
        for oid, _, _ in rows:
            with db.transaction():
                if box.complete(oid, owner):
                    print(oid, flush=True)
    """
)


def spawn(url: str, owner: str, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLAIMER, url, owner, mode], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def test_processes_sharing_the_outbox_never_take_the_same_row(pg_schema_url: str) -> None:  # noqa: F811
    db = open_database(pg_schema_url, pool_size=2)
    box = PostgresOutbox(db)
    with db.transaction():
        ids = {box.put({"scope": {"user_id": "ann"}, "n": n}) for n in range(600)}
    procs = [spawn(pg_schema_url, f"proc{i}", "work") for i in range(3)]
    for proc in procs:  # all are up before any claims, so they really compete
        go(proc)
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    taken = [[int(line) for line in out.split()] for out, _ in outputs]
    every = [oid for mine in taken for oid in mine]
    assert len(every) == len(set(every))
    assert set(every) == ids
    assert box.size() == 0
    db.close()


def test_rows_a_killed_replica_claimed_are_applied_by_another(pg_schema_url: str) -> None:  # noqa: F811
    db = open_database(pg_schema_url, pool_size=2)
    box = PostgresOutbox(db)
    with db.transaction():
        ids = {box.put({"scope": {"user_id": "ann"}, "n": n}) for n in range(30)}
    doomed = spawn(pg_schema_url, "doomed", "hold")
    go(doomed)
    assert doomed.stdout is not None and int(doomed.stdout.readline()) == 30
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.communicate(timeout=30)  # reaps it and closes its pipes
    assert doomed.returncode == -signal.SIGKILL
    assert box.claim(10, "early", lease_s=30.0) == []  # still leased to the dead replica
    time.sleep(1.2)  # its 1 s lease runs out
    survivor = spawn(pg_schema_url, "survivor", "work")
    go(survivor)
    out, err = survivor.communicate(timeout=120)
    assert survivor.returncode == 0, err
    assert {int(line) for line in out.split()} == ids
    assert box.size() == 0
    db.close()
