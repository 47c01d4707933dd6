"""`headroom serve --db postgresql://…` as real processes, with the official openai SDK as the
client and a scripted fake upstream: a fact written through one replica is recalled through
another on the same database, and a replica whose PostgreSQL goes away says `degraded` on /readyz
(with the reason) while it keeps answering from the upstream.

Each replica is the real command with the real local model, as an operator runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.pg import PgServer, pg_server, start_private_server  # noqa: F401 (fixtures)
from tests.servers import FakeUpstream, Reply, free_port, memory_block, recalled, running_upstream

ROOT = Path(__file__).resolve().parent.parent
FACT = "Keeps three beehives in the garden"


class Replica:
    """One `headroom serve` process; `start()` returns once /readyz says it is ready."""

    def __init__(self, db: str, upstream_url: str, log_dir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"replica-{self.port}.log"
        argv = [
            sys.executable, "-m", "headroom", "serve", "--db", db, "--host", "127.0.0.1",
            "--port", str(self.port), "--upstream", upstream_url, "--log-level", "warning",
        ]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=out, stderr=subprocess.STDOUT,
            )

    def readyz(self) -> dict[str, Any]:
        answer = httpx.get(f"{self.base}/readyz", timeout=10)
        body: dict[str, Any] = answer.json()
        body["http_status"] = answer.status_code
        return body

    def wait_ready(self, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, self.log.read_text(errors="replace")
            assert time.monotonic() < deadline, "replica not ready: " + self.log.read_text()
            try:
                body = self.readyz()
                if body["http_status"] == 200:
                    return body
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def client(self, user: str) -> OpenAI:
        return OpenAI(
            base_url=f"{self.base}/v1", api_key="sk-client", max_retries=0, timeout=60,
            default_headers={"X-Headroom-User-Id": user},
        )

    def kill(self) -> None:
        """SIGKILL: for a replica whose database is gone, whose SIGTERM would wait its drain
        timeout (25 s) for an outbox it cannot read."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, FakeUpstream]]:
    with running_upstream(FakeUpstream()) as (url, fake):
        yield url + "/v1", fake


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[Replica]]:
    """The replicas a test started, stopped after it."""
    started: list[Replica] = []
    yield started
    for replica in started:
        replica.stop()


def _chat(client: OpenAI, text: str) -> str:
    answer = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
    )
    return answer.choices[0].message.content or ""


def test_a_fact_written_through_one_replica_is_recalled_through_another(
    pg_server: PgServer,  # noqa: F811
    upstream: tuple[str, FakeUpstream],
    replicas: list[Replica],
    tmp_path: Path,
) -> None:
    url, fake = upstream
    database = pg_server.create_database("serve")
    try:
        replicas += [Replica(database, url, tmp_path), Replica(database, url, tmp_path)]
        a, b = replicas
        for replica in replicas:
            assert replica.wait_ready()["status"] == "ok"

        fake.queue(Reply("Lovely. " + memory_block([FACT])))
        assert _chat(a.client("hana"), "I keep bees, three hives.") == "Lovely."

        # The op is durable in the shared outbox when A answers; whichever replica claims it
        # applies it. B recalls it as soon as it is applied.
        deadline = time.monotonic() + 60
        while True:
            fake.queue(Reply("Honey, then."))
            assert _chat(b.client("hana"), "What do I keep in my garden?") == "Honey, then."
            if FACT in (recalled(fake.last) or ""):
                break
            assert time.monotonic() < deadline, f"B never recalled A's fact: {fake.last}"
            time.sleep(0.5)
        # Another user on B sees nothing of it.
        fake.queue(Reply("No idea."))
        _chat(b.client("ivo"), "What do I keep in my garden?")
        assert FACT not in (recalled(fake.last) or "")
        # Stored once, though two replicas' workers polled the outbox.
        stats = httpx.get(f"{b.base}/readyz", timeout=10).json()["health"]
        assert stats["outbox_pending"] == 0 and stats["dead_letters"] == 0
    finally:
        for replica in replicas:
            replica.stop()
        pg_server.drop_database(database)


def test_readyz_degrades_while_postgresql_is_unreachable(
    upstream: tuple[str, FakeUpstream], replicas: list[Replica], tmp_path: Path,
) -> None:
    """A second private server of its own, stopped under a running replica."""
    url, fake = upstream
    base = Path(tempfile.mkdtemp(prefix="headroom-pg-gone-"))
    server = start_private_server(base)
    stopped = False
    try:
        replica = Replica(server.create_database("gone"), url, tmp_path)
        replicas.append(replica)
        assert replica.wait_ready()["status"] == "ok"

        server.stop()
        stopped = True
        deadline = time.monotonic() + 60
        while True:
            body = replica.readyz()
            if body["status"] == "degraded":
                break
            assert time.monotonic() < deadline, f"never degraded: {body}"
            time.sleep(0.5)
        assert body["http_status"] == 200 and body["ready"] is True
        assert any("outbox unreadable" in r or "storage failing" in r for r in body["reasons"]), (
            body["reasons"]
        )
        # Fail open: the client still gets the upstream's answer.
        fake.queue(Reply("Still here."))
        assert _chat(replica.client("jon"), "Are you there?") == "Still here."
        replica.kill()
    finally:
        for running in replicas:
            running.stop()
        if not stopped:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
