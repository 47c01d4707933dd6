"""Write-behind: the response waits only for the outbox insert (never for embedding or indexing),
shutdown drains the queue, and the outbox left by a killed process is replayed on the next start,
each memory applied exactly once. On both backends (conftest PROXY_MODULES): on PostgreSQL each
test's database is a schema of its own, which the killed server process reaches by URL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from headroom.memory.hierarchical import HierarchicalMemory
from headroom.memory.models import AddOp, MemoryConfig, MemoryFilter, MemoryOps, Scope
from tests.backend_rows import row_counts
from tests.backend_targets import database_target
from tests.servers import (
    FakeUpstream,
    GatedEmbedder,
    Reply,
    free_port,
    memory_block,
    recalled,
    running_proxy,
    running_upstream,
)

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "What do I like?"}]}


@pytest.fixture
def database(request: pytest.FixtureRequest, proxy_backend: str, tmp_path: Path) -> Path | str:
    """This leg's database: a file, or a PostgreSQL schema's URL (also for a server process)."""
    return database_target(request, proxy_backend, tmp_path)


def _count(db: Path | str, table: str) -> int:
    """Rows in `table` ("outbox" or "memories"), read past the engine as another process would."""
    return row_counts(db)[table]


async def _rows(db: Path | str, embedder: Any, user: str) -> tuple[list[str], int]:
    """(every memory text of `user`, outbox rows left) from a fresh engine on `db`."""
    engine = await HierarchicalMemory.create(MemoryConfig(db_path=db), embedder=embedder)
    try:
        rows = await engine.query(MemoryFilter(user_id=user, all_scopes=True,
                                               include_superseded=True, limit=None))
        return sorted(m.content for m in rows), (await engine.stats())["outbox_pending"]
    finally:
        await engine.close()


def test_the_response_never_waits_for_the_write(tmp_path: Path, local_embedder: Any) -> None:
    gated = GatedEmbedder(local_embedder, trigger="kayak")
    with running_proxy(tmp_path / "p.db", gated) as p:
        client = p.client("rae")
        client.chat.completions.create(**CHAT)  # the SDK's first call is slow; not ours
        gated.gate.clear()
        try:
            p.upstream.queue(Reply("Noted. " + memory_block(["Paddles a sea kayak"])))
            started = time.monotonic()
            answer = client.chat.completions.create(**CHAT)
            assert answer.choices[0].message.content == "Noted."
            assert time.monotonic() - started < 1.0
            assert gated.waiting.wait(10)  # the write is held at the embedder right now...
            assert p.run(p.engine.stats("rae"))["rows"] == 0
            assert p.run(p.engine.stats("rae"))["outbox_pending"] == 1  # ...but durable
        finally:
            gated.gate.set()
        assert [m.content for m in p.memories("rae")] == ["Paddles a sea kayak"]


async def test_shutdown_drains_pending_writes(database: Path | str, local_embedder: Any) -> None:
    db = database
    gated = GatedEmbedder(local_embedder, trigger="kayak")
    gated.gate.clear()
    try:
        with running_proxy(db, gated) as p:
            p.upstream.queue(Reply("Noted. " + memory_block(["Paddles a sea kayak"])))
            p.client("sam").chat.completions.create(**CHAT)
            assert gated.waiting.wait(10)
            # Shutdown begins while the write is still held; it waits for it.
            threading.Timer(0.5, gated.gate.set).start()
    finally:
        gated.gate.set()
    assert await _rows(db, local_embedder, "sam") == (["Paddles a sea kayak"], 0)


async def test_outbox_left_by_a_killed_process_is_replayed_once(
    database: Path | str, local_embedder: Any
) -> None:
    """Rows inserted by `submit` with no worker running: exactly what a process killed right
    after answering leaves behind."""
    db = database
    engine = await HierarchicalMemory.create(MemoryConfig(db_path=db), embedder=local_embedder)
    ops = MemoryOps(add=(AddOp("Grows tomatoes on the balcony"),))
    await engine.submit(ops, Scope("tia"), request_id="hr-before-crash-1")
    await engine.submit(ops, Scope("tia", "s2"), request_id="hr-before-crash-2")  # sent twice
    await engine.submit(MemoryOps(add=(AddOp("Owns a sailboat"),)), Scope("ugo"))
    await engine.close()  # no worker: nothing applied, nothing drained
    assert _count(db, "outbox") == 3
    assert _count(db, "memories") == 0

    for _ in range(2):  # start, stop, start again: applied once, never twice
        with running_proxy(db, local_embedder) as p:
            assert [m.content for m in p.memories("tia")] == ["Grows tomatoes on the balcony"]
            assert [m.content for m in p.memories("ugo")] == ["Owns a sailboat"]
            p.upstream.queue(Reply("Tomatoes."))
            p.client("tia", "s3").chat.completions.create(**CHAT)
            assert "Grows tomatoes on the balcony" in (recalled(p.upstream.last) or "")
    assert _count(db, "outbox") == 0
    assert _count(db, "memories") == 2


def test_sigkill_after_answering_loses_nothing(database: Path | str, local_embedder: Any) -> None:
    """A real proxy process answers, queues the block in its outbox and is SIGKILLed before
    applying it (its model is still loading: it listens at once and loads in the background).
    The next start replays the outbox: the memory is there exactly once."""
    db = database
    port = free_port()
    upstream = FakeUpstream()
    with running_upstream(upstream) as (upstream_url, _):
        code = (
            "from headroom.proxy.server import serve\n"
            "from headroom.proxy.config import ProxyConfig\n"
            f"serve(ProxyConfig(host='127.0.0.1', port={port}, upstream_url={upstream_url!r}, "
            f"db_path={str(db)!r}, log_level='warning'))"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, process.stderr.read().decode()  # type: ignore
                assert time.monotonic() < deadline, "proxy subprocess did not start"
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            upstream.queue(Reply("Noted. " + memory_block(["Keeps bees in the garden"])))
            answer = httpx.post(f"{base}/v1/chat/completions", json=CHAT,
                                headers={"x-headroom-user-id": "vera"}, timeout=30)
            assert answer.json()["choices"][0]["message"]["content"] == "Noted."
            # Durable before acknowledged: the row committed before the answer's last byte.
            assert _count(db, "outbox") == 1
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            assert process.stderr is not None
            process.stderr.close()
        assert process.returncode == -signal.SIGKILL
        assert _count(db, "memories") == 0  # killed before applying

        with running_proxy(db, local_embedder, upstream=upstream) as p:
            assert [m.content for m in p.memories("vera")] == ["Keeps bees in the garden"]
    assert _count(db, "outbox") == 0
    assert _count(db, "memories") == 1
