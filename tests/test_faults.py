"""Fault injection against a real proxy process (uvicorn, a real SQLite file) in front of a
scripted upstream: SIGKILL right after the client has received a whole answer loses no memory op.

The server process is started and killed again and again on one database; its model is a fast
deterministic fake, so a restart costs only the interpreter's start-up.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes import FakeEmbedder
from tests.servers import (
    FakeUpstream,
    Reply,
    free_port,
    memory_block,
    running_proxy,
    running_upstream,
)

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 6
PER_ROUND = 35  # >= 200 answers; each round ends with a kill right after its last answer
DEADLINE_S = 240.0
LOCK_S = 0.3  # well inside ProxyConfig.durable_wait_s (1 s)

_SERVER = """
import uvicorn
from headroom.proxy.app import create_app
from headroom.proxy.config import ProxyConfig
from tests.fakes import FakeEmbedder

config = ProxyConfig(host="127.0.0.1", port={port}, upstream_url={url!r}, db_path={db!r},
                     log_level="warning")
app = create_app(config, embedder=FakeEmbedder(), warm=False)
uvicorn.run(app, host="127.0.0.1", port={port}, log_level="warning", lifespan="on")
"""


class ServerProcess:
    """One proxy process at a time on `db`; `start()` waits until it answers /healthz."""

    def __init__(self, db: Path, upstream_url: str) -> None:
        self.db = db
        self.upstream_url = upstream_url
        self.process: subprocess.Popen[bytes] | None = None
        self.base = ""

    def start(self) -> None:
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        code = _SERVER.format(port=port, url=self.upstream_url, db=str(self.db))
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                assert self.process.stderr is not None
                raise AssertionError(self.process.stderr.read().decode())
            assert time.monotonic() < deadline, "proxy process did not start"
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)

    def kill(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        assert self.process.returncode == -signal.SIGKILL
        assert self.process.stderr is not None
        self.process.stderr.close()
        self.process = None


def _reply(body: dict[str, Any]) -> Reply:
    tag = body["messages"][-1]["content"]
    return Reply(f"Noted {tag}. " + memory_block([fact(tag)]), chunk_seed=len(tag))


def fact(tag: str) -> str:
    return f"Keeps marker {tag}"  # near ones may supersede each other: rows are counted


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with running_upstream(FakeUpstream(responder=_reply)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, upstream: str) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("faults") / "p.db", upstream)
    try:
        yield process
    finally:
        process.kill()


def _hold_write_lock(db: Path, seconds: float) -> threading.Thread:
    """Take SQLite's write lock now and release it after `seconds`, on a thread."""
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")

    def release() -> None:
        time.sleep(seconds)
        conn.execute("ROLLBACK")
        conn.close()

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    return thread


def ask(client: httpx.Client, user: str, tag: str, *, stream: bool) -> str:
    """The visible answer, read to its very last byte."""
    payload = {"model": "gpt-test", "stream": stream,
               "messages": [{"role": "user", "content": tag}]}
    headers = {"x-headroom-user-id": user}
    if not stream:
        response = client.post("/v1/chat/completions", json=payload, headers=headers)
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"])
    with client.stream("POST", "/v1/chat/completions", json=payload, headers=headers) as r:
        r.raise_for_status()
        wire = r.read()
    assert wire.endswith(b"data: [DONE]\n\n")
    return "".join(
        c["delta"].get("content") or ""
        for event in wire.decode().split("\n\n") if event.startswith("data: {")
        for c in json.loads(event[6:])["choices"]
    )


def test_sigkill_right_after_the_answer_loses_no_op(server: ServerProcess) -> None:
    started = time.monotonic()
    acknowledged: dict[str, list[str]] = {}
    for round_ in range(ROUNDS):
        assert time.monotonic() - started < DEADLINE_S, "fault loop ran out of time"
        user = f"fault-{round_}"
        server.start()
        with httpx.Client(base_url=server.base, timeout=30) as client:
            for i in range(PER_ROUND):
                tag = f"r{round_}x{i}q"
                last = i == PER_ROUND - 1
                # Rounds alternate which kind of answer the kill follows. Before the last one,
                # another connection holds the write lock for a moment: an outbox insert made
                # after answering (as before issue 9) is still waiting for it when the kill
                # comes; one made before the answer's last byte has committed.
                locker = _hold_write_lock(server.db, LOCK_S) if last else None
                answer = ask(client, user, tag, stream=(i + round_) % 2 == 0)
                assert answer == f"Noted {tag}."
                acknowledged.setdefault(user, []).append(fact(tag))
        server.kill()  # at once: the last answer has just been read to its end
        if locker is not None:
            locker.join(10)

    assert sum(len(facts) for facts in acknowledged.values()) >= 200
    with running_proxy(server.db, FakeEmbedder()) as p:
        for user, facts in acknowledged.items():
            stored = [m.content for m in p.memories(user, include_superseded=True)]
            assert sorted(stored) == sorted(facts), user  # none lost, none twice
