"""`headroom outbox status|dead|redrive`, and dead letters in `stats` and `doctor`, on a real
SQLite file: writes are queued through the engine's own `submit`, parked the way the outbox worker
parks a row that keeps failing (the outbox adapter's `dead_letter`), and after a redrive the
engine's worker applies them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from headroom.memory.adapters import SQLiteOutbox
from headroom.memory.db import Database
from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import AddOp, MemoryConfig, MemoryFilter, MemoryOps, Scope
from tests.servers import running_upstream

ERROR = "TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]"


async def _queue(db: Path, embedder: Any, writes: list[tuple[str, str]]) -> list[int]:
    """One stored memory, then `writes` (user, fact) queued through the engine, not applied."""
    mem = await HierarchicalMemory.create(MemoryConfig(db_path=db), embedder=embedder)
    try:
        await mem.add("Works at Google", "alice")
        return [
            await mem.submit(MemoryOps(add=(AddOp(text),)), Scope(user_id=user),
                             request_id=f"req-{n}")
            for n, (user, text) in enumerate(writes)
        ]
    finally:
        await mem.close()


def _park(db: Path, outbox_ids: list[int], error: str = ERROR) -> None:
    """What the worker does with a row that keeps failing."""
    database = Database(db)
    try:
        outbox = SQLiteOutbox(database)
        for outbox_id in outbox_ids:
            assert outbox.dead_letter(outbox_id, error)
    finally:
        database.close()


@pytest.fixture
def parked(db: Path, local_embedder: Any) -> list[int]:
    """Two dead letters (bob's and carol's facts) and one write still queued (dave's)."""
    ids = asyncio.run(_queue(db, local_embedder, [
        ("bob", "Lives in Porto"), ("carol", "Plays the cello"), ("dave", "Drinks green tea"),
    ]))
    _park(db, ids[:2])
    return ids


def as_json(result: Result) -> Any:
    return json.loads(result.stdout)


def test_status_counts_queued_writes_and_dead_letters(hr: Any, parked: list[int]) -> None:
    data = as_json(hr("outbox", "status", "--json"))
    # Dead letters wait for an operator; they do not make the engine degraded (doctor fails).
    assert data == {"status": "ok", "reasons": [], "outbox_pending": 1, "dead_letters": 2}
    text = hr("outbox", "status").stdout
    assert "dead letters   2" in text and "queued writes  1" in text
    assert "headroom outbox redrive --all" in text


def test_status_of_a_clean_outbox_is_ok(hr: Any, db: Path, local_embedder: Any) -> None:
    asyncio.run(_queue(db, local_embedder, []))
    data = as_json(hr("outbox", "status", "--json"))
    assert data == {"status": "ok", "reasons": [], "outbox_pending": 0, "dead_letters": 0}


def test_dead_lists_each_letter_with_its_error_and_payload(hr: Any, parked: list[int]) -> None:
    letters = as_json(hr("outbox", "dead", "--json"))
    assert [letter["user_id"] for letter in letters] == ["bob", "carol"]
    assert [letter["outbox_id"] for letter in letters] == parked[:2]
    first = letters[0]
    assert first["error"] == ERROR and first["attempts"] == 1
    assert first["payload"]["ops"]["add"][0]["text"] == "Lives in Porto"
    assert first["payload"]["request_id"] == "req-0"

    table = hr("outbox", "dead").stdout
    assert "bob" in table and "carol" in table and "add 1" in table and "TextEncodeInput" in table
    limited = hr("outbox", "dead", "--limit", "1")
    assert "carol" not in limited.stdout and "showing the oldest 1" in limited.stderr


def test_dead_with_none_says_so(hr: Any, db: Path, local_embedder: Any) -> None:
    asyncio.run(_queue(db, local_embedder, []))
    result = hr("outbox", "dead")
    assert result.stdout == "" and "no dead letters" in result.stderr
    assert as_json(hr("outbox", "dead", "--json")) == []


def test_redrive_needs_ids_or_all_and_refuses_unknown_ids(hr: Any, parked: list[int]) -> None:
    assert "IDS or --all" in hr("outbox", "redrive", expect=2).stderr
    first = as_json(hr("outbox", "dead", "--json"))[0]["id"]
    assert "IDS or --all" in hr("outbox", "redrive", str(first), "--all", expect=2).stderr
    unknown = hr("outbox", "redrive", str(first), "9999", expect=1)
    assert unknown.stderr.strip() == (
        "error: no dead letter with id 9999 (see `headroom outbox dead`)"
    )
    assert as_json(hr("outbox", "status", "--json"))["dead_letters"] == 2  # nothing moved


def test_redrive_queues_them_again_and_the_worker_applies_them(
    hr: Any, db: Path, parked: list[int], local_embedder: Any
) -> None:
    bob, carol = (letter["id"] for letter in as_json(hr("outbox", "dead", "--json")))
    assert hr("outbox", "redrive", str(bob)).stdout.strip() == "queued 1 dead letters again"
    after_one = as_json(hr("outbox", "status", "--json"))
    assert (after_one["outbox_pending"], after_one["dead_letters"]) == (2, 1)
    assert [d["id"] for d in as_json(hr("outbox", "dead", "--json"))] == [carol]

    assert as_json(hr("outbox", "redrive", "--all", "--json")) == {"redriven": 1}
    assert as_json(hr("outbox", "status", "--json"))["dead_letters"] == 0

    async def apply_and_read() -> dict[str, list[str]]:
        mem = await HierarchicalMemory.create(MemoryConfig(db_path=db), embedder=local_embedder)
        try:
            await mem.start()
            await mem.drain(30)
            return {
                user: [m.content for m in await mem.query(MemoryFilter(user_id=user))]
                for user in ("bob", "carol", "dave")
            }
        finally:
            await mem.close()

    assert asyncio.run(apply_and_read()) == {
        "bob": ["Lives in Porto"], "carol": ["Plays the cello"], "dave": ["Drinks green tea"],
    }
    assert as_json(hr("outbox", "status", "--json"))["outbox_pending"] == 0


def test_stats_shows_dead_letters(hr: Any, parked: list[int]) -> None:
    data = as_json(hr("stats", "--json"))
    assert (data["outbox_pending"], data["outbox_dead"]) == (1, 2)
    text = hr("stats").stdout
    assert "queued writes    1" in text
    assert "dead letters     2: writes that kept failing; see `headroom outbox dead`" in text


def test_doctor_fails_on_dead_letters_with_the_fix(hr: Any, parked: list[int]) -> None:
    with running_upstream() as (url, _):
        failing = hr("doctor", "--upstream", url, expect=1)
        lines = failing.stdout.splitlines()
        outbox = next(line for line in lines if "outbox" in line)
        assert outbox.startswith("fail") and "2 dead letters" in outbox and "1 queued" in outbox
        assert "TextEncodeInput" in outbox  # the oldest letter's error, to start from
        fix = lines[lines.index(outbox) + 1]
        assert "headroom outbox dead" in fix and "headroom outbox redrive --all" in fix
        assert "1 of 6 checks failed: outbox" in failing.stderr

        hr("outbox", "redrive", "--all")
        healthy = hr("doctor", "--upstream", url)
    assert any(line.startswith("ok") and "outbox" in line and "no dead letters" in line
               for line in healthy.stdout.splitlines())
