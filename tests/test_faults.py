"""Fault injection against real proxy processes (uvicorn, a real SQLite file) in front of a
scripted upstream, each attack counted: SIGKILL right after an answer and at random moments under
load, a poison block, two processes on one file, a full disk, upstream hang/drop/disconnect, and
hostile inputs.

The server processes' model is a fast deterministic fake that, like the real tokenizer, refuses
text that is not valid UTF-8 (and a marked "pill" text, standing for any text the model cannot
take); a restart costs only the interpreter's start-up. The `attack_*` functions are shared with
bench/faults.py, which runs them at larger counts; each returns a `Tally`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

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
PILL = "POISON-PILL"  # the servers' model refuses any text holding it
READ_TIMEOUT_S = 1.5  # the shared server's upstream read timeout
BODY_TIMEOUT_S = 1.0  # the shared server's body read timeout

# What `headroom serve` runs (proxy.server.serve: its uvicorn settings, header read timeout,
# signal handling), with only the model swapped for the fake.
_SERVER = """
import headroom.proxy.server as server
from headroom.proxy.app import create_app
from headroom.proxy.config import ProxyConfig
from tests.fakes import FakeEmbedder


class StrictEmbedder(FakeEmbedder):
    # The real tokenizer raises on text that is not valid UTF-8 (issue 9's poison pill).
    def embed(self, texts):
        for text in texts:
            text.encode("utf-8")
            if {pill!r} in text:
                raise ValueError("this model cannot take that text")
        return super().embed(texts)


config = ProxyConfig(host="127.0.0.1", port={port}, upstream_url={url!r}, db_path={db!r},
                     log_level="warning", **{extra!r})
server.create_app = lambda config: create_app(config, embedder=StrictEmbedder(), warm=False)
server.serve(config)
"""


class ServerProcess:
    """One proxy process on `db`; `start()` waits until it answers /healthz. `config` goes to
    ProxyConfig as given (literals only)."""

    def __init__(self, db: Path, upstream_url: str, **config: Any) -> None:
        self.db = db
        self.upstream_url = upstream_url
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None  # the running process's stderr
        self.base = ""

    def start(self) -> None:
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        code = _SERVER.format(port=port, url=self.upstream_url, db=str(self.db), pill=PILL,
                              extra=self.config)
        # A file, not a pipe: a server logging more than a pipe holds would block on it.
        self.log = log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=self.log,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                log.seek(0)
                message = log.read().decode()
                log.close()
                raise AssertionError(message)
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
        if self.log is not None:
            self.log.close()
        self.process = None

    def ready(self) -> dict[str, Any]:
        response = httpx.get(f"{self.base}/readyz", timeout=5)
        assert response.status_code in (200, 503), response.text
        return dict(response.json())


@contextlib.contextmanager
def started(*servers: ServerProcess) -> Iterator[None]:
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in servers:
            server.kill()


@dataclass
class Tally:
    """One attack's count: ops whose answer the client fully received (`tried`), stored exactly
    once (`survived`), never stored (`lost`); `notes` are the attack's other findings, each of
    which must be zero or true for the attack to pass."""

    case: str
    tried: int = 0
    survived: int = 0
    lost: int = 0
    notes: dict[str, Any] = field(default_factory=dict)


# --- the scripted upstream -------------------------------------------------------------------

_ALIAS_LINE = re.compile(r"^\[(m\d+)\] \([^)]*\) (.*)$", re.M)


def fact(tag: str) -> str:
    # Three words of its own: under the fake model's 64 hashed buckets one word of two facts
    # shares a bucket often enough that they would count as near-duplicates (a reinforcement).
    return f"Keeps marker {tag} {tag}b {tag}c"


def replacement(tag: str) -> str:
    return f"Swapped marker {tag}z"


def _aliases(body: dict[str, Any]) -> dict[str, str]:
    """The memory frame's alias per memory text, as the model would read it."""
    found: dict[str, str] = {}
    for message in body.get("messages", []):
        content = message.get("content")
        if message.get("role") == "system" and isinstance(content, str):
            for alias, text in _ALIAS_LINE.findall(content):
                found[text.strip()] = alias
    return found


@dataclass
class Script:
    """The upstream's answer, chosen by the client's last message: `verb:tag`."""

    alias_misses: list[str] = field(default_factory=list)

    def __call__(self, body: dict[str, Any]) -> Reply:
        verb, colon, tag = str(body["messages"][-1]["content"]).partition(":")
        if not colon:
            verb, tag = "", verb
        if verb == "hang":
            return Reply("late", delay_s=30.0)
        if verb == "drop":  # cut inside the block: the client must never see "<memory"
            text = f"Partial {tag}. " + memory_block([fact(tag)])
            return Reply(text, fail_after_bytes=1300, chunk_seed=1)
        if verb == "slow":
            return Reply("word " * 400, event_delay_s=0.02, chunk_seed=1)
        if verb == "poison":
            return Reply(f"Noted {tag}. " + '<memory>{"add":["poison \\ud800 tok"]}</memory>')
        if verb == "pill":
            return Reply(f"Noted {tag}. " + memory_block([f"{PILL} {tag}"]))
        if verb in ("forget", "update"):
            alias = _aliases(body).get(fact(tag))
            if alias is None:
                self.alias_misses.append(tag)
                return Reply(f"Noted {tag}.")
            ops = ({"forget": [alias]} if verb == "forget"
                   else {"update": [{"id": alias, "text": replacement(tag)}]})
            return Reply(f"Noted {tag}. " + memory_block(**ops))
        return Reply(f"Noted {tag}. " + memory_block([fact(tag)]), chunk_seed=len(tag))


# --- a client that counts only whole answers ---------------------------------------------------


def ask(client: httpx.Client, user: str, tag: str, *, stream: bool, verb: str = "") -> str:
    """The visible answer, read to its very last byte."""
    content = f"{verb}:{tag}" if verb else tag
    payload = {"model": "gpt-test", "stream": stream,
               "messages": [{"role": "user", "content": content}]}
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


# --- reading the database directly -------------------------------------------------------------


def _rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def content_rows(db: Path) -> Counter[str]:
    """Memory rows per content, current or not."""
    return Counter(c for (c,) in _rows(db, "SELECT content FROM memories"))


def current(db: Path, content: str) -> bool:
    return bool(_rows(db, "SELECT 1 FROM memories WHERE content = ? AND valid_until IS NULL "
                          "AND forgotten_at IS NULL", content))


def double_applies(db: Path) -> int:
    """Events one request made twice on one memory (a row applied twice), plus reinforcements
    (every fact here is new, so a reinforcement is a second apply)."""
    twice = _rows(db, "SELECT count(*) FROM (SELECT 1 FROM memory_events WHERE request_id IS NOT "
                      "NULL GROUP BY request_id, memory_id, op HAVING count(*) > 1)")[0][0]
    again = _rows(db, "SELECT count(*) FROM memory_events WHERE op = 'reinforce'")[0][0]
    return int(twice) + int(again)


def outbox_size(db: Path) -> int:
    return int(_rows(db, "SELECT count(*) FROM outbox")[0][0])


def wait_for(check: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


def count_stored(db: Path, facts: list[str], tally: Tally) -> None:
    """Fill `survived`/`lost` for `facts`, and note contents stored more than once."""
    rows = content_rows(db)
    tally.tried = len(facts)
    tally.survived = sum(1 for f in facts if rows[f] == 1)
    tally.lost = sum(1 for f in facts if rows[f] == 0)
    tally.notes["stored twice"] = sum(1 for n in rows.values() if n > 1)
    tally.notes["double applies"] = double_applies(db)


# --- the attacks -----------------------------------------------------------------------------


def attack_random_kills(db: Path, upstream_url: str, requests: int, *, workers: int = 6,
                        seed: int = 9, deadline_s: float = 120.0, **config: Any) -> Tally:
    """`requests` requests (stream and not) from `workers` threads while the server (given
    `config`) is SIGKILLed at random moments and restarted; then every op whose answer was fully
    received must be stored once, and nothing stored twice."""
    rng = random.Random(seed)
    server = ServerProcess(db, upstream_url, **config)
    acknowledged: list[str] = []
    sent = [0]
    lock = threading.Lock()
    started_at = time.monotonic()
    kills = 0

    def load(round_: int, worker: int, stop: threading.Event) -> None:
        with httpx.Client(base_url=server.base, timeout=10) as client:
            for i in range(requests):
                with lock:
                    if stop.is_set() or sent[0] >= requests:
                        return
                    sent[0] += 1
                tag = f"k{round_}w{worker}i{i}q"
                try:
                    answer = ask(client, f"kill-{round_}-{worker}", tag,
                                 stream=(i + worker) % 2 == 0)
                except (httpx.HTTPError, AssertionError, json.JSONDecodeError):
                    return  # cut by the kill (not acknowledged), and the server is gone
                assert answer == f"Noted {tag}."
                with lock:
                    acknowledged.append(fact(tag))

    round_ = 0
    while sent[0] < requests:
        assert time.monotonic() - started_at < deadline_s, "kill loop ran out of time"
        server.start()
        stop = threading.Event()
        threads = [threading.Thread(target=load, args=(round_, w, stop), daemon=True)
                   for w in range(workers)]
        for t in threads:
            t.start()
        # At a random moment, or once a random share of the requests has gone out in this
        # round, whichever comes first: a faster server must still be killed a few times.
        kill_at = time.monotonic() + rng.uniform(0.2, 3.0)
        with lock:
            round_quota = sent[0] + rng.randint(20, 60)
        while time.monotonic() < kill_at and sent[0] < round_quota:
            time.sleep(0.005)
        # Every other kill lands while another connection holds the write lock: answers given
        # before their op is durable (as before issue 9) are then lost; durable ones wait.
        locker = _hold_write_lock(db, LOCK_S) if round_ % 2 else None
        if locker is not None:
            time.sleep(rng.uniform(0.0, LOCK_S * 0.8))
        stop.set()  # no new requests; those in flight are cut
        server.kill()  # whatever is in flight: mid-request, mid-stream, mid-apply
        if locker is not None:
            locker.join(10)
        kills += 1
        for t in threads:
            t.join(15)
        round_ += 1

    with started(server):  # the restarted writer applies what the outbox holds
        drained = wait_for(lambda: outbox_size(db) == 0, 30)
    tally = Tally("SIGKILL at random moments")
    count_stored(db, acknowledged, tally)
    tally.notes.update({"requests sent": sent[0], "kills": kills, "outbox drained": drained})
    return tally


def attack_poison(server: ServerProcess, others: int, *, land_s: float = 10.0) -> Tally:
    """A block with a lone surrogate escape and one the model refuses, then `others` normal
    writes of other users: every normal one lands within `land_s`, the pill is a dead letter,
    nothing stays in the outbox and /readyz answers throughout."""
    db = server.db
    tags = [f"p{i}n{random.randrange(10**9)}q" for i in range(others)]
    normal = [fact(tag) for tag in tags]
    probes_ok = 0
    with httpx.Client(base_url=server.base, timeout=10) as client:
        assert ask(client, "poison-a", "s1", stream=False, verb="poison") == "Noted s1."
        assert ask(client, "poison-b", "s2", stream=True, verb="pill") == "Noted s2."
        for i, tag in enumerate(tags):
            assert ask(client, f"poison-other-{i}", tag, stream=i % 2 == 0) == f"Noted {tag}."
        started_at = time.monotonic()
        while time.monotonic() - started_at < land_s:
            probes_ok += server.ready()["status"] in ("ok", "degraded")
            rows = content_rows(db)
            if all(rows[t] == 1 for t in normal):
                break
            time.sleep(0.1)
    tally = Tally("poison block, then other users' writes")
    count_stored(db, normal, tally)
    tally.notes["seconds to land"] = round(time.monotonic() - started_at, 2)
    tally.notes["surrogate stored cleaned"] = content_rows(db)["poison \ufffd tok"] == 1
    dead = wait_for(lambda: _rows(db, "SELECT count(*) FROM outbox_dead WHERE payload LIKE ?",
                                  f"%{PILL}%")[0][0] == 1, 15)
    tally.notes["pill is a dead letter"] = dead
    tally.notes["outbox empty"] = wait_for(lambda: outbox_size(db) == 0, 5)
    tally.notes["readyz answered"] = probes_ok > 0
    tally.notes["readyz dead letters"] = server.ready()["health"].get("dead_letters")
    return tally


def attack_two_processes(db: Path, upstream_url: str, script: Script, users: int,
                         steps: int) -> Tally:
    """Two servers on one file. Each user's thread adds a fact through one process, waits until
    it is current, then forgets or updates it through the other, while the other users do the
    same: no row applied twice, no forgotten or superseded memory current again."""
    a, b = ServerProcess(db, upstream_url), ServerProcess(db, upstream_url)
    added: list[str] = []
    retired: list[str] = []  # forgotten or superseded: never current again
    replaced: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()

    def user(u: int) -> None:
        clients = [httpx.Client(base_url=s.base, timeout=10) for s in (a, b)]
        try:
            for step in range(steps):
                tag = f"d{u}s{step}q"
                first, second = clients[(u + step) % 2], clients[(u + step + 1) % 2]
                uid = f"two-{u}"
                ask(first, uid, tag, stream=step % 2 == 0)
                with lock:
                    added.append(fact(tag))
                if not wait_for(lambda t=tag: current(db, fact(t)), 10, 0.05):
                    failures.append(f"{tag} never became current")
                    continue
                verb = "forget" if step % 2 == 0 else "update"
                ask(second, uid, tag, stream=step % 3 == 0, verb=verb)
                with lock:
                    retired.append(fact(tag))
                    if verb == "update":
                        replaced.append(replacement(tag))
        finally:
            for c in clients:
                c.close()

    with started(a, b):
        threads = [threading.Thread(target=user, args=(u,), daemon=True) for u in range(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        drained = wait_for(lambda: outbox_size(db) == 0, 30)
    tally = Tally("two processes, one file")
    count_stored(db, added + replaced, tally)
    tally.notes["outbox drained"] = drained
    tally.notes["failures"] = len(failures) + len(script.alias_misses)
    tally.notes["resurrections"] = sum(1 for text in retired if current(db, text))
    tally.notes["retired"] = len(retired)
    tally.notes["replacements current"] = sum(1 for text in replaced if current(db, text))
    return tally


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `where`, unmounted on the way out."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def fill(directory: Path) -> Path:
    """A file taking every free byte of `directory`'s filesystem."""
    filler = directory / "filler"
    block = b"\0" * 65536
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(block)
                f.flush()
    with contextlib.suppress(OSError), open(filler, "ab") as f:  # the last partial block
        for _ in range(64):
            f.write(b"\0" * 1024)
            f.flush()
    return filler


def attack_full_disk(mount: Path, upstream_url: str, facts: int, *, workers: int = 4) -> Tally:
    """The database on a small tmpfs, the disk filled, then `facts` answers (each for a new user,
    whose first memory grows the file): answers keep coming, /readyz says degraded with a
    reason; then the filler goes and every acknowledged fact is stored."""
    with small_disk(mount, "24m"):
        db = mount / "full.db"
        server = ServerProcess(db, upstream_url)
        acknowledged: list[str] = []
        answered_s: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        with started(server):
            with httpx.Client(base_url=server.base, timeout=10) as client:
                ask(client, "disk-warm", "w0q", stream=False)  # schema and first user in place
            assert wait_for(lambda: current(db, fact("w0q")), 10)
            filler = fill(mount)

            def load(worker: int) -> None:
                with httpx.Client(base_url=server.base, timeout=15) as client:
                    for i in range(worker, facts, workers):
                        tag = f"f{i}q"
                        t0 = time.monotonic()
                        try:
                            answer = ask(client, f"disk-{i}", tag, stream=i % 2 == 0)
                        except (httpx.HTTPError, AssertionError) as exc:
                            errors.append(f"{tag}: {exc!r}")
                            continue
                        with lock:
                            answered_s.append(time.monotonic() - t0)
                            if answer == f"Noted {tag}.":
                                acknowledged.append(fact(tag))

            threads = [threading.Thread(target=load, args=(w,), daemon=True)
                       for w in range(workers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            degraded: dict[str, Any] = {}

            def says_degraded() -> bool:
                degraded.update(server.ready())
                return degraded["status"] == "degraded" and bool(degraded["reasons"])

            was_degraded = wait_for(says_degraded, 10)
            full_rows = content_rows(db)
            stored_while_full = sum(1 for f in acknowledged if full_rows[f] == 1)
            filler.unlink()  # room again
            landed = wait_for(lambda: all(content_rows(db)[f] == 1 for f in acknowledged), 40,
                              0.25)
            recovered = wait_for(lambda: server.ready()["status"] == "ok", 20, 0.25)
        tally = Tally("full disk, then room")
        count_stored(db, acknowledged, tally)
        tally.notes.update({
            "requests": facts, "errors": len(errors), "first errors": errors[:3],
            "degraded while full": was_degraded, "reasons": degraded.get("reasons", [])[:2],
            "stored while full": stored_while_full, "all landed": landed,
            "ok again": recovered,
            "slowest answer s": round(max(answered_s, default=0.0), 2),
        })
        return tally


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def script() -> Script:
    return Script()


@pytest.fixture(scope="module")
def fake_upstream(script: Script) -> Iterator[tuple[str, FakeUpstream]]:
    with running_upstream(FakeUpstream(responder=script)) as (url, fake):
        yield url, fake


@pytest.fixture(scope="module")
def upstream(fake_upstream: tuple[str, FakeUpstream]) -> str:
    return fake_upstream[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, upstream: str) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("faults") / "p.db", upstream)
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, upstream: str) -> Iterator[ServerProcess]:
    """One long-lived server for the cases that do not kill it, with short timeouts."""
    process = ServerProcess(
        tmp_path_factory.mktemp("shared") / "s.db", upstream,
        upstream_read_timeout_s=READ_TIMEOUT_S, body_read_timeout_s=BODY_TIMEOUT_S,
        header_read_timeout_s=BODY_TIMEOUT_S,
    )
    with started(process):
        yield process


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


# --- write path ---------------------------------------------------------------------------------


def test_sigkill_right_after_the_answer_loses_no_op(server: ServerProcess) -> None:
    started_at = time.monotonic()
    acknowledged: dict[str, list[str]] = {}
    for round_ in range(ROUNDS):
        assert time.monotonic() - started_at < DEADLINE_S, "fault loop ran out of time"
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


def test_sigkill_at_random_moments_loses_no_acknowledged_op(
    tmp_path: Path, upstream: str
) -> None:
    tally = attack_random_kills(tmp_path / "k.db", upstream, requests=200, deadline_s=180)
    assert tally.notes["kills"] >= 3 and tally.notes["outbox drained"], tally
    assert tally.tried >= 120, tally  # most of the 200 are answered between kills
    assert tally.lost == 0 and tally.survived == tally.tried, tally
    assert tally.notes["stored twice"] == 0 and tally.notes["double applies"] == 0, tally


def test_a_poison_block_holds_back_no_other_write(shared: ServerProcess) -> None:
    tally = attack_poison(shared, others=6)
    assert tally.lost == 0 and tally.survived == tally.tried == 6, tally
    assert tally.notes["seconds to land"] < 5, tally
    assert tally.notes["surrogate stored cleaned"], tally  # made valid at parse time
    assert tally.notes["pill is a dead letter"] and tally.notes["outbox empty"], tally
    assert tally.notes["readyz answered"] and tally.notes["readyz dead letters"] >= 1, tally


def test_two_processes_on_one_file_apply_once_and_resurrect_nothing(
    tmp_path: Path, upstream: str, script: Script
) -> None:
    script.alias_misses.clear()
    tally = attack_two_processes(tmp_path / "two.db", upstream, script, users=4, steps=6)
    assert tally.notes["outbox drained"] and tally.notes["failures"] == 0, tally
    assert tally.lost == 0 and tally.survived == tally.tried == 24 + 12, tally
    assert tally.notes["double applies"] == 0 and tally.notes["stored twice"] == 0, tally
    assert tally.notes["retired"] == 24 and tally.notes["resurrections"] == 0, tally
    assert tally.notes["replacements current"] == 12, tally


def test_a_full_disk_loses_no_acknowledged_fact(tmp_path: Path, upstream: str) -> None:
    tally = attack_full_disk(tmp_path / "mnt", upstream, facts=24)
    assert tally.notes["errors"] == 0 and tally.tried == 24, tally  # answers kept flowing
    assert tally.notes["degraded while full"], tally
    assert tally.notes["stored while full"] < tally.tried, tally  # the disk really was full
    assert tally.lost == 0 and tally.survived == tally.tried, tally
    assert tally.notes["double applies"] == 0 and tally.notes["ok again"], tally


# --- upstream ----------------------------------------------------------------------------------


def _openai_error(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}, error
    return dict(error)


def test_an_upstream_that_hangs_gets_an_openai_error_within_the_read_timeout(
    shared: ServerProcess,
) -> None:
    t0 = time.monotonic()
    response = httpx.post(f"{shared.base}/v1/chat/completions", timeout=20, json={
        "model": "m", "messages": [{"role": "user", "content": "hang:h1"}]})
    elapsed = time.monotonic() - t0
    assert response.status_code == 504, response.text
    _openai_error(response)
    assert READ_TIMEOUT_S <= elapsed < READ_TIMEOUT_S + 2.0, elapsed


def test_an_upstream_dropped_mid_stream_breaks_the_stream_and_leaks_no_block(
    shared: ServerProcess,
) -> None:
    got = b""
    broken = False
    with httpx.Client(base_url=shared.base, timeout=10) as client:
        payload = {"model": "m", "stream": True,
                   "messages": [{"role": "user", "content": "drop:u1q"}]}
        headers = {"x-headroom-user-id": "dropped"}
        with client.stream("POST", "/v1/chat/completions", json=payload, headers=headers) as r:
            assert r.status_code == 200
            try:
                for chunk in r.iter_bytes():
                    got += chunk
            except httpx.HTTPError:
                broken = True
    events = [json.loads(e[6:]) for e in got.decode().split("\n\n") if e.startswith("data: {")]
    text = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    assert text == "Partial u1q.", text  # the bytes so far, none of the block
    assert b"Keeps marker" not in got
    # Never a stream that looks complete: a broken transfer or an error event, no [DONE].
    assert broken or set(events[-1]["error"]) >= {"message", "type", "code"}
    assert not got.endswith(b"data: [DONE]\n\n")


def test_a_client_that_leaves_mid_stream_releases_the_upstream(
    shared: ServerProcess, fake_upstream: tuple[str, FakeUpstream]
) -> None:
    fake = fake_upstream[1]
    with httpx.Client(base_url=shared.base, timeout=10) as client:
        payload = {"model": "m", "stream": True,
                   "messages": [{"role": "user", "content": "slow:c1"}]}
        with client.stream("POST", "/v1/chat/completions", json=payload) as r:
            chunks = r.iter_bytes()
            next(chunks)
            assert fake.open_streams == 1
    t0 = time.monotonic()
    assert wait_for(lambda: fake.open_streams == 0, 1.5, 0.02), fake.open_streams
    assert time.monotonic() - t0 < 1.5


# --- bad input ---------------------------------------------------------------------------------


def test_a_string_stream_flag_is_a_400(shared: ServerProcess) -> None:
    response = httpx.post(f"{shared.base}/v1/chat/completions", timeout=10, json={
        "model": "m", "stream": "true", "messages": [{"role": "user", "content": "x:y"}]})
    assert response.status_code == 400, response.text
    assert _openai_error(response)["type"] == "invalid_request_error"


def test_a_body_nested_100000_deep_is_a_400(shared: ServerProcess) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "x": ' + (
        b"[" * 100_000 + b"]" * 100_000 + b"}")
    response = httpx.post(f"{shared.base}/v1/chat/completions", timeout=10, content=body,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    _openai_error(response)
    assert httpx.get(f"{shared.base}/healthz", timeout=5).status_code == 200


def test_a_stalled_client_body_is_a_408(shared: ServerProcess) -> None:
    host, port = shared.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"mo")
        t0 = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer:
            part = sock.recv(4096)
            if not part:
                break
            answer += part
        elapsed = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert elapsed < BODY_TIMEOUT_S + 2.0, elapsed



def test_stalled_request_headers_are_a_408(shared: ServerProcess) -> None:
    host, port = shared.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        t0 = time.monotonic()
        answer = b""
        while part := sock.recv(4096):
            answer += part
        elapsed = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"]
    assert elapsed < BODY_TIMEOUT_S + 2.0, elapsed
