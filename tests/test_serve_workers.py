"""`serve` with `workers=2`: two proxy processes on one port and one database. Requests are
served by both, a memory written through one is recalled through the other, SIGTERM stops all of
them with exit 0; and `--workers` above 1 is refused on a database private to one process."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from headroom.proxy.config import ProxyConfig
from headroom.proxy.workers import check_workers
from tests.cli_fixtures import invoke_serve
from tests.servers import (
    FakeUpstream,
    Reply,
    free_port,
    memory_block,
    recalled,
    running_upstream,
    wait_until,
)

_SERVE = """
import json, sys
from headroom.proxy.config import ProxyConfig
from headroom.proxy.server import serve
serve(ProxyConfig(**json.loads(sys.argv[1])))
"""

USER = {"x-headroom-user-id": "workers-user", "content-type": "application/json"}
FACT = "The user's cat is called Marmalade and sleeps on the piano."


@dataclass
class Workers:
    process: subprocess.Popen[bytes]
    port: int
    upstream: FakeUpstream
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def children(self) -> list[int]:
        path = f"/proc/{self.process.pid}/task/{self.process.pid}/children"
        return [int(pid) for pid in Path(path).read_text().split()]

    def worker_of(self, conn: http.client.HTTPConnection) -> int | None:
        """The worker process holding the server end of `conn` (from /proc: the socket inode
        of the established connection to the client's port, among each child's fds)."""
        assert conn.sock is not None
        client_port = conn.sock.getsockname()[1]
        inode = None
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if (int(local.split(":")[1], 16), int(remote.split(":")[1], 16), state) == (
                self.port, client_port, "01"
            ):
                inode = fields[9]
        for pid in self.children():
            fd_dir = Path(f"/proc/{pid}/fd")
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd) == f"socket:[{inode}]":
                        return pid
                except OSError:
                    continue
        return None


def _request(conn: http.client.HTTPConnection, method: str, path: str,
             body: dict[str, Any] | None = None) -> tuple[int, Any]:
    conn.request(method, path, body=json.dumps(body) if body else None, headers=USER)
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"null")


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    tmp = tmp_path_factory.mktemp("workers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    with running_upstream() as (upstream_root, fake), (tmp / "stderr.txt").open("wb") as err:
        port = free_port()
        config = {"port": port, "db_path": str(tmp / "w.db"), "upstream_url": upstream_root,
                  "workers": 2, "drain_timeout_s": 20.0}
        process = subprocess.Popen([sys.executable, "-c", _SERVE, json.dumps(config)],
                                   stdout=subprocess.DEVNULL, stderr=err, env=env)
        served = Workers(process, port, fake, tmp / "stderr.txt")
        try:
            wait_until(lambda: "all 2 workers serving" in served.stderr() or
                        process.poll() is not None, 240, "both workers to serve")
            assert process.poll() is None, served.stderr()
            yield served
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(30)


@pytest.fixture(scope="module")
def one_per_worker(workers: Workers) -> Iterator[dict[int, http.client.HTTPConnection]]:
    """A kept-alive connection to each worker, each worker's model loaded."""
    held: dict[int, http.client.HTTPConnection] = {}
    spare: list[http.client.HTTPConnection] = []
    for _ in range(60):
        conn = http.client.HTTPConnection("127.0.0.1", workers.port, timeout=30)
        assert _request(conn, "GET", "/healthz")[0] == 200
        pid = workers.worker_of(conn)
        assert pid in workers.children()
        if pid in held:
            spare.append(conn)  # kept open so the next connection goes elsewhere more often
        else:
            held[pid] = conn
        if len(held) == 2:
            break
    for conn in spare:
        conn.close()
    assert len(held) == 2, "60 connections all went to one worker"
    for conn in held.values():
        wait_until(lambda c=conn: _request(c, "GET", "/readyz")[0] == 200, 120, "the model")
    yield held
    for conn in held.values():
        conn.close()


def test_two_worker_processes_serve_the_port(
    workers: Workers, one_per_worker: dict[int, http.client.HTTPConnection]
) -> None:
    assert len(workers.children()) >= 2
    assert set(one_per_worker) <= set(workers.children())
    assert workers.process.pid not in one_per_worker  # the parent only supervises


def test_a_memory_written_through_one_worker_is_recalled_through_the_other(
    workers: Workers, one_per_worker: dict[int, http.client.HTTPConnection]
) -> None:
    writer, reader = one_per_worker.values()
    workers.upstream.queue(Reply(f"Noted. {memory_block(add=[FACT])}"))
    told = "My cat Marmalade naps on the piano."
    status, answer = _request(writer, "POST", "/v1/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": told}],
    })
    assert status == 200
    assert answer["choices"][0]["message"]["content"].strip() == "Noted."

    def recalled_through_reader() -> bool:
        workers.upstream.queue(Reply("Marmalade."))
        status, _ = _request(reader, "POST", "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "what is my cat called?"}],
        })
        assert status == 200
        return FACT in (recalled(workers.upstream.last) or "")

    wait_until(recalled_through_reader, 30, "the other worker to recall the memory")


def test_sigterm_stops_every_worker_and_exits_0(
    workers: Workers, one_per_worker: dict[int, http.client.HTTPConnection]
) -> None:
    workers.process.send_signal(signal.SIGTERM)
    assert workers.process.wait(60) == 0, workers.stderr()
    for pid in one_per_worker:  # the parent reaped them before it exited
        assert not Path(f"/proc/{pid}").exists()
    assert workers.stderr().count("headroom.proxy.app: shutdown complete") == 2
    assert "all workers stopped" in workers.stderr()


@pytest.mark.parametrize("db", [":memory:", "", "file:x?mode=memory&cache=shared"])
def test_more_than_one_worker_needs_a_shared_database(db: str) -> None:
    with pytest.raises(Exception, match="private to one process"):
        check_workers(ProxyConfig(db_path=db, workers=2))
    check_workers(ProxyConfig(db_path=db, workers=1))
    check_workers(ProxyConfig(db_path="postgresql://u@h/db", workers=4))


def test_the_cli_refuses_workers_on_an_in_memory_database(
    tmp_path: Path, served: list[ProxyConfig]
) -> None:
    result = invoke_serve(tmp_path, "--workers", "2", "--db", ":memory:", expect=2)
    assert "private to one process" in result.stderr
    assert not served
    invoke_serve(tmp_path, env={"HEADROOM_WORKERS": "3"})
    assert served[-1].workers == 3
