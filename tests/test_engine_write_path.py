"""The write path under faults (issue 9), on real SQLite files: a poison row never holds back
other rows, a full database loses no op, two processes apply each row exactly once, changed
facts become versions, and operator limits hold. Every wait has a deadline."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headroom.memory import HierarchicalMemory, MemoryConfig
from headroom.memory.errors import LimitExceededError, StorageError
from headroom.memory.models import AddOp, ForgetOp, MemoryFilter, MemoryOps, Scope, UpdateOp
from tests.backend_rows import outbox_rows
from tests.fakes import FakeEmbedder

ROOT = Path(__file__).resolve().parent.parent


class PoisonEmbedder(FakeEmbedder):
    """Fails any batch holding a text marked POISON, as the tokenizer failed on a lone
    surrogate (`TextEncodeInput must be Union[...]`), until `cured`."""

    def __init__(self) -> None:
        super().__init__()
        self.cured = False

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not self.cured and any("POISON" in t for t in texts):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[...]]")
        return super().embed(texts)


class HeadEmbedder(FakeEmbedder):
    """Embeds a text's first eight words only, so long texts that differ there stay apart (the
    64-bucket fake makes any two texts of hundreds of words near-duplicates)."""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return super().embed([" ".join(t.split()[:8]) for t in texts])


async def open_memory(
    path: Path, embedder: FakeEmbedder | None = None, **options: Any
) -> HierarchicalMemory:
    return await HierarchicalMemory.create(
        MemoryConfig(db_path=path, **options), embedder=embedder or FakeEmbedder()
    )


def add(*texts: str) -> MemoryOps:
    return MemoryOps(add=tuple(AddOp(t) for t in texts))


async def contents(memory: HierarchicalMemory, user: str, *, history: bool = False) -> list[str]:
    found = await memory.query(
        MemoryFilter(user_id=user, all_scopes=True, include_superseded=history, limit=None)
    )
    return sorted(m.content for m in found)


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


# --- durable submit ------------------------------------------------------------------------------


async def test_submit_returns_once_the_row_is_committed(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    mem = await open_memory(path)
    try:
        outbox_id = await mem.submit(add("Committed before submit returns"), Scope("ann"))
        assert isinstance(outbox_id, int)
        assert outbox_rows(mem.config.db_path) == 1  # visible to another connection
        health = await mem.health()
        assert health == {
            "status": "ok", "reasons": [], "outbox_pending": 1, "dead_letters": 0,
            "queued_in_memory": 0,
        }
    finally:
        await mem.close(drain_timeout=0)


async def test_text_is_made_valid_at_engine_entry(memory: HierarchicalMemory) -> None:
    """A lone surrogate (valid JSON as "\\ud800") is replaced before it reaches the outbox, the
    embedder or SQLite, on the write-behind path and on the direct API."""
    await memory.start()
    await memory.submit(add("poison \ud800 tok"), Scope("ann"))
    direct = await memory.add("also \udfff here", "bob")
    await memory.drain(timeout=10)
    assert await contents(memory, "ann") == ["poison \ufffd tok"]
    assert direct.content == "also \ufffd here"
    assert (await memory.health())["dead_letters"] == 0


# --- no poison pill -----------------------------------------------------------------------------


async def test_a_poison_row_is_parked_and_never_holds_back_other_users(tmp_path: Path) -> None:
    embedder = PoisonEmbedder()
    mem = await open_memory(tmp_path / "m.db", embedder, outbox_max_attempts=3)
    try:
        await mem.start()
        await mem.submit(add("POISON fact of mallory"), Scope("mallory"), request_id="bad")
        for user in ("ann", "bob", "cy"):
            await mem.submit(add(f"{user} likes green tea"), Scope(user), request_id=user)

        async def others_landed() -> bool:
            return all([await contents(mem, u) == [f"{u} likes green tea"]
                        for u in ("ann", "bob", "cy")])

        await wait_until(others_landed, 3.0, "the rows behind the poison one")
        await mem.drain(timeout=15)  # the poison row is parked after 3 attempts

        assert await contents(mem, "mallory") == []
        letters = await mem.dead_letters()
        assert [(d["user_id"], d["attempts"], d["payload"]["request_id"]) for d in letters] == [
            ("mallory", 3, "bad")
        ]
        assert "TextEncodeInput" in letters[0]["error"]
        health = await mem.health()
        assert (health["status"], health["dead_letters"], health["outbox_pending"]) == (
            "ok", 1, 0
        )
        assert (await mem.stats())["dead_letters"] == 1
        stats = mem.writer_stats()
        assert (stats["applied"], stats["dead_lettered"], stats["dead_letters"]) == (3, 1, 1)
        assert stats["row_failures"] == 3 and stats["retries"] == 0  # never a systemic backoff

        embedder.cured = True
        assert await mem.redrive_dead_letters([letters[0]["id"]]) == 1
        await mem.drain(timeout=10)
        assert await contents(mem, "mallory") == ["POISON fact of mallory"]
        assert await mem.dead_letters() == []
        assert await mem.redrive_dead_letters() == 0
    finally:
        await mem.close()


async def test_a_malformed_row_is_parked_with_its_error(tmp_path: Path) -> None:
    """A row no code can read (written by hand, or by a broken version) is a fault of that row."""
    mem = await open_memory(tmp_path / "m.db", outbox_max_attempts=2)
    try:
        mem.store.outbox.put({"ops": {"add": [{"txt": "no text key"}]}, "scope": {"user_id": "x"}})
        await mem.submit(add("fine afterwards"), Scope("ann"))
        await mem.start()
        await mem.drain(timeout=10)
        assert await contents(mem, "ann") == ["fine afterwards"]
        [letter] = await mem.dead_letters()
        assert letter["attempts"] == 2 and letter["error"].startswith("KeyError")
    finally:
        await mem.close()


async def test_an_embedder_that_is_down_is_not_a_row_fault(tmp_path: Path) -> None:
    """Every text fails, the probe too: nothing is counted against the rows, none is parked
    (with one attempt allowed, a single row fault would park the row at once)."""
    embedder = FakeEmbedder()
    mem = await open_memory(tmp_path / "m.db", embedder, outbox_max_attempts=1)
    try:
        embedder.fail_with = RuntimeError("model server down")
        await mem.start()
        await mem.submit(add("waits for the embedder"), Scope("ann"))
        with pytest.raises(TimeoutError):
            await mem.drain(timeout=1.0)
        health = await mem.health()
        assert health["status"] == "degraded" and "embedder" in health["reasons"][0]
        assert mem.writer_stats()["row_failures"] == 0
        embedder.fail_with = None
        await mem.drain(timeout=40)
        assert await contents(mem, "ann") == ["waits for the embedder"]
        assert (await mem.health())["status"] == "ok"
        assert await mem.dead_letters() == []
    finally:
        await mem.close()


# --- a full database -------------------------------------------------------------------------


async def set_full(mem: HierarchicalMemory, full: bool) -> None:
    """Cap the file at its current size (SQLite's max_page_count), or lift the cap. Runs on the
    writer thread, which owns the connection the writes go through."""
    db = mem.store.db  # type: ignore[attr-defined]

    def run() -> None:
        if not full:
            db.set_max_bytes(None)
            return
        pages = db.conn.execute("PRAGMA page_count").fetchone()[0]
        db.set_max_bytes(int(pages) * int(db.conn.execute("PRAGMA page_size").fetchone()[0]))

    await mem._executors.on_writer(run)


def bulky(i: int) -> str:
    """A text long enough to need new pages of its own (see `HeadEmbedder`)."""
    return f"fact {i} kept through a full disk " + " ".join(f"w{i}x{j}" for j in range(700))


@pytest.mark.sqlite_only("makes the SQLite connection fail as on a full disk")
async def test_a_full_database_loses_no_op(tmp_path: Path) -> None:
    mem = await open_memory(tmp_path / "m.db", HeadEmbedder())
    try:
        await mem.start()
        await mem.submit(add("before the disk filled"), Scope("ann"))
        await mem.drain(timeout=10)
        await set_full(mem, True)
        ids = [
            await mem.submit(add(bulky(i)), Scope(f"user{i % 4}"), request_id=f"r{i}")
            for i in range(40)
        ]
        assert None in ids  # some could not even reach the outbox: they wait in memory
        health = await mem.health()
        assert health["status"] == "degraded" and health["queued_in_memory"] > 0
        assert any("disk full" in reason for reason in health["reasons"])
        with pytest.raises(TimeoutError):
            await mem.drain(timeout=0.5)

        await set_full(mem, False)
        await mem.drain(timeout=30)
        stored = [c for u in range(4) for c in await contents(mem, f"user{u}")]
        assert sorted(stored) == sorted(bulky(i) for i in range(40))  # each exactly once
        assert await mem.health() == {
            "status": "ok", "reasons": [], "outbox_pending": 0, "dead_letters": 0,
            "queued_in_memory": 0,
        }
        assert mem.writer_stats()["storage_failures"] > 0
    finally:
        await mem.close()


@pytest.mark.sqlite_only("makes the SQLite connection fail as on a full disk")
async def test_the_in_memory_queue_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    mem = await open_memory(path, HeadEmbedder(), memory_queue_max_ops=3)
    try:
        await set_full(mem, True)
        results = []
        for i in range(40):  # until the free pages are used up, inserts still fit
            results.append(await mem.submit(add(bulky(i)), Scope("ann")))
            if results[-1] is None:
                break
        assert results[-1] is None
        await mem.submit(MemoryOps(add=(AddOp(bulky(100)), AddOp(bulky(101)))), Scope("ann"))
        assert mem.writer_stats()["queued_in_memory"] == 3
        with pytest.raises(StorageError) as info:
            await mem.submit(add(bulky(102)), Scope("ann"))
        assert info.value.reason == "disk full"

        await set_full(mem, False)
        assert isinstance(await mem.submit(add("room again"), Scope("ann")), int)
        assert mem.writer_stats()["queued_in_memory"] == 0
        assert outbox_rows(path) == len(results) + 2  # the waiting ones went first, in order
    finally:
        await mem.close(drain_timeout=0)


# --- two processes on one file ---------------------------------------------------------------

_WORKER = """
    import asyncio, json, sys, time
    from pathlib import Path
    from headroom.memory import HierarchicalMemory, MemoryConfig
    from tests.fakes import FakeEmbedder

    async def main():
        path, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
        mem = await HierarchicalMemory.create(MemoryConfig(db_path=path), embedder=FakeEmbedder())
        ready.touch()
        deadline = time.monotonic() + 60
        while not go.exists():
            if time.monotonic() > deadline:
                raise SystemExit("no go signal")
            await asyncio.sleep(0.005)
        await mem.start()
        await mem.drain(timeout=60)
        stats = mem.writer_stats()
        await mem.close()
        print(json.dumps(stats))

    asyncio.run(main())
"""


async def run_two_workers(path: Path, tmp: Path) -> list[dict[str, int]]:
    """Two OS processes, each a HierarchicalMemory on `path`, start draining at one moment."""
    go = tmp / "go"
    go.unlink(missing_ok=True)
    procs, readies = [], []
    for n in range(2):
        ready = tmp / f"ready{n}"
        ready.unlink(missing_ok=True)
        readies.append(ready)
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-c", textwrap.dedent(_WORKER), str(path), str(ready), str(go),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        ))
    try:
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in readies):
            assert time.monotonic() < deadline, "workers did not start"
            assert all(p.returncode is None for p in procs), "a worker died at start"
            await asyncio.sleep(0.02)
        go.touch()
        outputs = [await asyncio.wait_for(p.communicate(), 90) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err.decode()
    return [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]


async def events_by_request(mem: HierarchicalMemory, user: str) -> Counter[tuple[str, str]]:
    found = await mem.query(
        MemoryFilter(user_id=user, all_scopes=True, include_superseded=True, limit=None)
    )
    seen: Counter[tuple[str, str]] = Counter()
    for m in found:
        for e in await mem.get_events(m.id):
            if e["request_id"]:
                seen[(e["request_id"], e["op"])] += 1
    return seen


@pytest.mark.sqlite_only("child processes open the SQLite file by its path")
async def test_two_processes_apply_every_row_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    adds, kept = 120, 20
    mem = await open_memory(path)
    try:
        to_forget = [await mem.add(f"old fact {j} lemon{j}", "ann") for j in range(kept)]
        to_update = [await mem.add(f"draft status {j} plum{j}", "ann") for j in range(kept)]
        for i in range(adds):
            await mem.submit(add(f"note {i} alpha{i} beta{i}"), Scope("ann"), request_id=f"a{i}")
            if i % 6 == 0:  # forgets and updates interleaved with the adds
                j = i // 6
                await mem.submit(MemoryOps(forget=(ForgetOp(to_forget[j].id),)), Scope("ann"),
                                 request_id=f"f{j}")
                await mem.submit(MemoryOps(update=(UpdateOp(to_update[j].id, f"final {j}"),)),
                                 Scope("ann"), request_id=f"u{j}")
    finally:
        await mem.close(drain_timeout=0)

    stats = await run_two_workers(path, tmp_path)
    assert sum(s["applied"] for s in stats) == adds + 2 * kept
    assert sum(s["dropped"] + s["lost_claims"] + s["row_failures"] for s in stats) == 0

    mem = await open_memory(path)
    try:
        seen = await events_by_request(mem, "ann")
        expected = Counter({(f"a{i}", "add"): 1 for i in range(adds)})
        expected.update({(f"f{j}", "forget"): 1 for j in range(kept)})
        expected.update({(f"u{j}", "supersede"): 1 for j in range(kept)})
        expected.update({(f"u{j}", "add"): 1 for j in range(kept)})  # the new version
        assert seen == expected  # no request applied twice, none lost
        assert (await mem.health())["outbox_pending"] == 0
        # add -> forget -> replay: what the model forgot stays forgotten.
        notes = await mem.query(MemoryFilter(user_id="ann", limit=None))
        for m in notes:
            if m.content.startswith("note "):
                await mem.forget(m.id)
    finally:
        await mem.close()

    assert [s["applied"] for s in await run_two_workers(path, tmp_path)] == [0, 0]
    mem = await open_memory(path)
    try:
        current = await contents(mem, "ann")
        assert current == sorted(f"final {j}" for j in range(kept))
        assert len(await contents(mem, "ann", history=True)) == adds + 3 * kept
    finally:
        await mem.close()


async def test_rows_a_dead_worker_had_claimed_are_applied_once_its_lease_runs_out(
    tmp_path: Path,
) -> None:
    mem = await open_memory(tmp_path / "m.db")
    try:
        await mem.submit(add("claimed by a worker that died"), Scope("ann"), request_id="r1")
        outbox = mem.store.outbox  # type: ignore[attr-defined]
        assert [row[0] for row in outbox.claim(10, "host:1:dead", 0.5)] != []
        await mem.start()
        await mem.drain(timeout=20)
        assert await contents(mem, "ann") == ["claimed by a worker that died"]
        assert await events_by_request(mem, "ann") == Counter({("r1", "add"): 1})
    finally:
        await mem.close()


# --- changed facts ---------------------------------------------------------------------------


async def test_a_changed_fact_supersedes_the_near_duplicate(tmp_path: Path) -> None:
    # The bag-of-words fake scores one changed word in five at 0.8: the threshold sits below.
    mem = await open_memory(tmp_path / "m.db", dedup_threshold=0.75)
    try:
        old = await mem.add("My phone number is 555-1234", "ann")
        new = await mem.add("My phone number is 555-9876", "ann")
        assert new.id != old.id and new.supersedes == old.id
        assert [m.content for m in await mem.get_history(new.id)] == [
            "My phone number is 555-1234", "My phone number is 555-9876",
        ]
        assert await contents(mem, "ann") == ["My phone number is 555-9876"]
        supersede = [e for e in await mem.get_events(old.id) if e["op"] == "supersede"]
        assert supersede[0]["new"]["reason"] == "changed fact"

        same = await mem.add("my phone number is 555-9876!", "ann")  # restated
        assert same.id == new.id and same.access_count == 1

        await mem.start()  # the model's path makes the same decision
        await mem.submit(add("Appointment with Dr Lee at the clinic on Monday at 10am"),
                         Scope("ann"))
        await mem.submit(add("Appointment with Dr Lee at the clinic on Tuesday at 3pm"),
                         Scope("ann"))
        await mem.drain(timeout=10)
        current = await contents(mem, "ann")
        assert "Appointment with Dr Lee at the clinic on Tuesday at 3pm" in current
        assert "Appointment with Dr Lee at the clinic on Monday at 10am" not in current
    finally:
        await mem.close()


# --- operator limits -------------------------------------------------------------------------


async def test_memories_per_user_limit(tmp_path: Path) -> None:
    mem = await open_memory(tmp_path / "m.db", max_memories_per_user=3)
    try:
        await mem.start()
        texts = [f"fact {i} kiwi{i} mango{i}" for i in range(5)]
        await mem.submit(add(*texts), Scope("ann"))
        await mem.submit(add("other user is fine"), Scope("bob"))
        await mem.drain(timeout=10)
        assert await contents(mem, "ann") == sorted(texts[:3])
        assert await contents(mem, "bob") == ["other user is fine"]
        assert mem.writer_stats()["skipped_limit"] == 2
        again = await mem.add(texts[0], "ann")  # a reinforce adds no memory: allowed
        assert again.access_count == 1
        with pytest.raises(LimitExceededError) as info:
            await mem.add("one too many", "ann")
        assert info.value.limit == "max_memories_per_user"
    finally:
        await mem.close()


async def test_new_users_per_minute_limit(tmp_path: Path) -> None:
    mem = await open_memory(tmp_path / "m.db", max_new_users_per_minute=2)
    try:
        await mem.start()
        for n in range(4):
            await mem.submit(add(f"hello from user {n}"), Scope(f"u{n}"))
        await mem.drain(timeout=10)
        landed = [n for n in range(4) if await contents(mem, f"u{n}")]
        assert landed == [0, 1]
        await mem.submit(add("known users still write"), Scope("u0"))
        await mem.drain(timeout=10)
        assert len(await contents(mem, "u0")) == 2
        assert mem.writer_stats()["skipped_limit"] == 2
    finally:
        await mem.close()
