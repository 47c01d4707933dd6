"""Proxy overhead: the same requests sent straight to a zero-latency fake upstream and through
the proxy, interleaved, with the proxy's CPU time and its own overhead receipt beside them.

    python bench/proxy_overhead.py [--memories 1000,10000,100000] [--concurrency 1,8,64]
                                   [--requests 300] [--workers 1] [--write-share 0.1]
    python bench/proxy_overhead.py --quick [--workers 2]  # c=1 and c=8 on 1k memories, ~1 min
    python bench/proxy_overhead.py --formats [chat,responses,messages] [--memories 10000]
                                   [--users 1000] [--concurrency 1,8] [--requests 200]

Main table (chat completions, non-streaming): one heavy user, `user-0000`, with 1k / 10k / 100k
memories (one store per size; `--memories`), and per concurrency level these rows:

- pass-through: no user header, so no memory work at all (run on the first store only);
- memory on, fresh queries: every query text is new (no query-embedding cache hit);
- memory on, repeated queries: 20 queries, each sent once in the warm-up, then drawn again
  (embedding cache hits; recall's search still runs);
- LiteLLM (no memory), when `litellm[proxy]` is installed (not a dependency): the peer row.

Pairing, and why "added" is per pair: each job goes to the upstream directly and through the
proxy, back to back from the same worker, in rotating order, so both see the same machine load.
Added latency is computed per pair (proxied minus direct of the same job) and its percentiles
are reported. The old table subtracted percentiles of two separately sorted distributions; at
concurrency 16/64 the direct side's own queueing tail then exceeded the proxied one's and some
"added p99" came out negative, which measured the neighbours, not the proxy.

Also per cell: the proxy process tree's CPU seconds per 1,000 requests (utime + stime from
/proc via psutil, warm-up excluded; with `--workers N` the workers are counted too), the
`X-Headroom-Memory-Overhead-Ms` receipt's p50 next to the measured added p50 (the receipt cannot
see the server's socket and HTTP parsing, so it should sit a little below), proxied throughput
(concurrency / mean latency: the rate the proxy alone would sustain with that many clients),
recalled answers (the upstream saw one of the user's own memories), errors, cross-user leaks.
The machine, date, commit and load averages (at the start, per cell, at the end) are printed.

Processes: the fake upstream (a raw ASGI app under uvicorn) and the proxy
(`proxy.server.serve`, the real thing: MiniLM, sqlite-vec, FTS5; `--workers N` is passed to its
config) each run in their own process; this process is the load generator (httpx, keep-alive).
A share of memory-on answers (`--write-share`) carries a `<memory>` block, so writes (embedding
and indexing) run alongside recall, as in real traffic; a `<memory` reaching the client, an
error or a leak fails the run.

Stores: built through the public `add_many` API with real MiniLM vectors of a pool of distinct
sentences (store_bench.py: embedding 100k texts here would take most of an hour), cached under
bench/.cache by size, pool and the commit of `memory/` (`--rebuild` forces it). The heavy
user's memories are pool sentences made distinct by a number; each vector is its sentence's
real vector plus a little seeded noise (cosine ~0.98 to it), renormalised, so no two are equal
and an index or quantizer sees real-shaped, distinct vectors. Every memory ends with its
owner's tag `[user-NNNN]`, which the fake upstream echoes, for the leak check.

`--formats`: a table per wire format (chat completions, OpenAI Responses, Anthropic Messages)
on a store of `--memories` spread over `--users` users, streaming and not.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from store_bench import (  # noqa: E402
    CACHE,
    PoolEmbedder,
    drafts_for,
    embed_cached,
    machine,
    make_memory_pool,
    make_queries,
    real_embedder,
)

from tests.servers import (  # noqa: E402
    message_object,
    messages_events,
    named_sse,
    response_object,
    responses_events,
)

_TAG = re.compile(r"\[(user-\d{4})\]")
_NUMBER = re.compile(r" #\d+$")
_FORMATS_START = "<!-- proxy_overhead_formats:start -->"
_FORMATS_END = "<!-- proxy_overhead_formats:end -->"
_HEAVY_START = "<!-- proxy_overhead_heavy:start -->"
_HEAVY_END = "<!-- proxy_overhead_heavy:end -->"
HEAVY_USER = "user-0000"
REPEATED_QUERIES = 20


# --- the zero-latency fake upstream (its own process) ---------------------------------------------


def _completion(text: str, model: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }).encode()


def _pieces(text: str) -> list[str]:
    return [text[i : i + 8] for i in range(0, len(text), 8)]


def _chunks(text: str, model: str) -> list[bytes]:
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
            "model": model}
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}]
    events += [{**base, "choices": [{"index": 0, "delta": {"content": p},
                                     "finish_reason": None}]} for p in _pieces(text)]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


def _response(text: str, model: str) -> bytes:
    return json.dumps(response_object(text, model)).encode()


def _response_events(text: str, model: str) -> list[bytes]:
    return [named_sse([e]) for e in responses_events(_pieces(text), model)]


def _message(text: str, model: str) -> bytes:
    return json.dumps(message_object(text, model)).encode()


def _message_events(text: str, model: str) -> list[bytes]:
    return [named_sse([e]) for e in messages_events(_pieces(text), model)]


# The upstream's answer builders per API path: (complete JSON, SSE events).
_ANSWERS: dict[str, tuple[Any, Any]] = {
    "/v1/chat/completions": (_completion, _chunks),
    "/v1/responses": (_response, _response_events),
    "/v1/messages": (_message, _message_events),
}


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = json.loads(body or b"{}")
    # Recalled memories land in messages, instructions or system depending on the API: the
    # whole body is searched for owner tags.
    tags = sorted(set(_TAG.findall(json.dumps(request))))
    headers = dict(scope["headers"])
    # Echoed with their brackets, as the load generator's leak check reads them.
    answer = "ok " + " ".join(f"[{tag}]" for tag in tags)
    if headers.get(b"x-bench-block") == b"1":
        n = headers.get(b"x-bench-n", b"0").decode()
        answer += f' <memory>{{"add":[{{"text":"bench fact {n}","category":"fact"}}]}}</memory>'
    model = request.get("model", "bench")
    complete, events = _ANSWERS.get(scope["path"], _ANSWERS["/v1/chat/completions"])
    if request.get("stream"):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for chunk in events(answer, model):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    payload = complete(answer, model)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def run_upstream(port: int) -> None:
    import uvicorn

    uvicorn.run(upstream_app, host="127.0.0.1", port=port, log_level="warning",
                access_log=False, lifespan="on")


# --- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, timeout: float, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == status:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer {status} within {timeout:.0f}s")


def start_upstream() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_for(url + "/v1/models", 30, status=200)
    return proc, url


def start_proxy(upstream: str, db: Path, *, workers: int = 1,
                env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """`headroom serve` as a process; `workers` goes to `ProxyConfig.workers` (several proxy
    processes on one port); `env` adds variables (an A/B run points PYTHONPATH elsewhere)."""
    port = free_port()
    options = {"port": port, "upstream_url": upstream, "db_path": str(db),
               "log_level": "warning"}
    if workers != 1:
        options["workers"] = workers
    code = (
        "import json, sys; from headroom.proxy.server import serve; "
        "from headroom.proxy.config import ProxyConfig; "
        "serve(ProxyConfig(**json.loads(sys.argv[1])))"
    )
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(options)], env=full_env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/readyz", 600)  # the model loads in the background; ready = recall on
    except BaseException:
        stop(proc)
        raise
    return proc, url


def litellm_available() -> bool:
    return importlib.util.find_spec("litellm") is not None and importlib.util.find_spec(
        "litellm.proxy") is not None


def start_litellm(upstream: str) -> tuple[subprocess.Popen[bytes], str]:
    """LiteLLM's proxy in front of the same fake upstream, one model `bench`, default single
    worker, no database, no logging callbacks: its own overhead, no memory."""
    port = free_port()
    config = Path(tempfile.mkdtemp(prefix="headroom-litellm-")) / "config.yaml"
    config.write_text(
        "model_list:\n  - model_name: bench\n    litellm_params:\n"
        f"      model: openai/bench\n      api_base: {upstream}/v1\n      api_key: bench\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "litellm.proxy.proxy_cli", "--config", str(config),
         "--port", str(port), "--host", "127.0.0.1"],
        env={**os.environ, "LITELLM_LOG": "ERROR"}, stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/health/liveliness", 300)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


# --- the stores ---------------------------------------------------------------------------------


class TaggedPoolEmbedder(PoolEmbedder):
    """Real vectors of pool sentences, looked up with the `[user-NNNN]` tag and the ` #n`
    number stripped. A numbered text gets its sentence's vector plus seeded noise (`noise`:
    per-dimension standard deviation), renormalised, so numbered copies are distinct."""

    def __init__(self, model_id: str, vectors: dict[str, np.ndarray], noise: float = 0.0):
        super().__init__(model_id, vectors)
        self.noise = noise

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = super().embed([_TAG.sub("", _NUMBER.sub("", t)).rstrip() for t in texts]).copy()
        if self.noise:
            for i, text in enumerate(texts):
                if _NUMBER.search(text):
                    rng = np.random.default_rng(zlib.crc32(text.encode()))
                    out[i] += rng.normal(0.0, self.noise, out.shape[1]).astype(np.float32)
                    out[i] /= np.linalg.norm(out[i])
        return out


def _memory_commit() -> str:
    """The commit of `memory/` (its tree at HEAD): a store built by another engine version is
    not reused."""
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD:memory"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return out or "unknown"


def _pool_lookup(pool_size: int, noise: float) -> tuple[list[tuple[str, str]],
                                                        TaggedPoolEmbedder]:
    embedder = real_embedder("default", 1, cached=False)
    pool = make_memory_pool(pool_size)
    vectors = embed_cached(embedder, [t for _, t in pool], "pool", 64)
    lookup = TaggedPoolEmbedder(embedder.model_id,
                                dict(zip([t for _, t in pool], vectors, strict=True)), noise)
    return pool, lookup


def _fill(cached: Path, drafts: list[Any], lookup: TaggedPoolEmbedder) -> None:
    from headroom.memory.hierarchical import HierarchicalMemory
    from headroom.memory.models import MemoryConfig

    async def fill() -> None:
        tmp = cached.with_suffix(".tmp")
        for suffix in ("", "-wal", "-shm"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
        mem = await HierarchicalMemory.create(MemoryConfig(db_path=tmp), embedder=lookup)
        t0 = time.perf_counter()
        for i in range(0, len(drafts), 500):
            await mem.add_many(drafts[i : i + 500])
        await mem.close()
        print(f"built {len(drafts):,} memories in {time.perf_counter() - t0:.0f}s", flush=True)
        tmp.rename(cached)

    CACHE.mkdir(parents=True, exist_ok=True)
    asyncio.run(fill())


def _work_copy(cached: Path | None) -> Path:
    """Each run works on a fresh copy (the proxy writes to it)."""
    work = Path(tempfile.mkdtemp(prefix="headroom-bench-")) / "memory.db"
    if cached is not None:
        shutil.copy(cached, work)
    return work


def build_store(size: int, users: int, pool_size: int) -> Path:
    """`size` tagged memories spread over `users` users (the `--formats` store)."""
    cached = CACHE / f"proxy-store-{size}-{users}-{pool_size}-{_memory_commit()}.db"
    if size and not cached.exists():
        pool, lookup = _pool_lookup(pool_size, 0.0)
        drafts = drafts_for(size, users, pool, seed=11)
        for d in drafts:
            d.content = f"{d.content} [{d.user_id}]"
            d.dedup = False
        _fill(cached, drafts, lookup)
    return _work_copy(cached if size else None)


def build_heavy_store(size: int, pool_size: int, *, rebuild: bool = False) -> Path:
    """One user (`HEAVY_USER`) with `size` memories, plus 50 light users with 20 each, so the
    file is not a one-user toy and the leak check has neighbours to catch."""
    from headroom.memory import MemoryDraft
    from headroom.memory.models import utcnow

    cached = CACHE / f"proxy-heavy-{size}-{pool_size}-{_memory_commit()}.db"
    if rebuild:
        cached.unlink(missing_ok=True)
    if not cached.exists():
        import random

        pool, lookup = _pool_lookup(pool_size, 0.01)
        rng = random.Random(size)
        now = utcnow()

        def draft(user: str, n: int) -> Any:
            category, text = pool[rng.randrange(len(pool))]
            session = f"s{rng.randrange(3)}" if rng.random() < 0.3 else None
            return MemoryDraft(
                f"{text} [{user}] #{n}", user, session_id=session, category=category,
                importance=round(rng.uniform(0.2, 0.8), 2),
                created_at=now - timedelta(days=rng.uniform(0, 365)), dedup=False,
            )

        drafts = [draft(HEAVY_USER, n) for n in range(size)]
        drafts += [draft(f"user-{u:04d}", n) for u in range(1, 51) for n in range(20)]
        rng.shuffle(drafts)
        _fill(cached, drafts, lookup)
    return _work_copy(cached)


# --- load generation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WireFormat:
    """How the load generator speaks one API: the request, and where the text is in the answer."""

    name: str
    path: str
    headers: dict[str, str]
    body: Callable[[str, bool], dict[str, Any]]
    text_of: Callable[[dict[str, Any]], str]  # the complete answer's visible text
    delta_of: Callable[[dict[str, Any]], str | None]  # one stream event's text, if it has any


def _chat_delta(event: dict[str, Any]) -> str | None:
    choices = event.get("choices")
    return choices[0]["delta"].get("content") if choices else None


def _responses_text(answer: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for item in answer["output"]
                   if item["type"] == "message" for part in item["content"])


def _responses_delta(event: dict[str, Any]) -> str | None:
    return event["delta"] if event.get("type") == "response.output_text.delta" else None


def _messages_text(answer: dict[str, Any]) -> str:
    return "".join(b["text"] for b in answer["content"] if b["type"] == "text")


def _messages_delta(event: dict[str, Any]) -> str | None:
    if event.get("type") == "content_block_delta" and event["delta"]["type"] == "text_delta":
        return str(event["delta"]["text"])
    return None


FORMATS: dict[str, WireFormat] = {
    "chat": WireFormat(
        "chat", "/v1/chat/completions", {"authorization": "Bearer bench"},
        lambda q, stream: {"model": "bench", "stream": stream,
                           "messages": [{"role": "user", "content": q}]},
        lambda a: a["choices"][0]["message"]["content"], _chat_delta),
    "responses": WireFormat(
        "responses", "/v1/responses", {"authorization": "Bearer bench"},
        lambda q, stream: {"model": "bench", "stream": stream, "input": q},
        _responses_text, _responses_delta),
    "messages": WireFormat(
        "messages", "/v1/messages", {"x-api-key": "bench", "anthropic-version": "2023-06-01"},
        lambda q, stream: {"model": "bench", "stream": stream, "max_tokens": 64,
                           "messages": [{"role": "user", "content": q}]},
        _messages_text, _messages_delta),
}


@dataclass
class Target:
    """One system under test: where it listens, whose CPU time is its cost, and whether it
    speaks Headroom's headers (LiteLLM gets the same requests without them)."""

    name: str
    url: str
    proc: subprocess.Popen[bytes] | None
    headroom: bool = True


@dataclass
class Run:
    latencies: dict[int, float] = field(default_factory=dict)  # job number -> ms
    ttft: dict[int, float] = field(default_factory=dict)
    receipts: list[float] = field(default_factory=list)  # the overhead header, ms
    errors: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)  # what each error was
    blocks: int = 0  # answers in which `<memory` reached the client
    leaks: int = 0
    recalled: int = 0  # answers that echo one of the user's own memory tags
    cpu_s: float = 0.0  # the target's process tree, over the measured jobs

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] += 1


@dataclass(frozen=True)
class Job:
    n: int
    user: str | None  # None: no user header (pass-through)
    query: str
    block: bool  # the upstream's answer carries a <memory> block


async def one(client: httpx.AsyncClient, url: str, fmt: WireFormat, job: Job, *,
              stream: bool, headroom: bool, run: Run) -> None:
    """`headroom`: the request carries the user header and the bench's block switch (the
    direct side and LiteLLM get neither)."""
    headers = dict(fmt.headers)
    if headroom and job.user is not None:
        headers["x-headroom-user-id"] = job.user
    if headroom and job.block:
        headers |= {"x-bench-block": "1", "x-bench-n": str(job.n)}
    body = fmt.body(job.query, stream)
    t0 = time.perf_counter()
    try:
        if stream:
            text, raw = "", []
            first: float | None = None
            async with client.stream("POST", url + fmt.path, json=body,
                                     headers=headers) as response:
                if response.status_code != 200:
                    run.error(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                    return
                async for line in response.aiter_lines():
                    raw.append(line)
                    if line.startswith("data: {"):
                        piece = fmt.delta_of(json.loads(line[6:]))
                        if piece and first is None:
                            first = time.perf_counter()
                        text += piece or ""
            run.ttft[job.n] = ((first or time.perf_counter()) - t0) * 1000
            seen = "\n".join(raw)
        else:
            response = await client.post(url + fmt.path, json=body, headers=headers)
            if response.status_code != 200:
                run.error(f"HTTP {response.status_code}: {response.content[:200]!r}")
                return
            text, seen = fmt.text_of(response.json()), response.text
        run.latencies[job.n] = (time.perf_counter() - t0) * 1000
    except httpx.HTTPError as exc:
        run.error(f"{type(exc).__name__}: {exc}")
        return
    receipt = response.headers.get("x-headroom-memory-overhead-ms")
    if receipt is not None:
        run.receipts.append(float(receipt))
    # Every event counts, not only the deltas: a block left in a `done` or `completed` event's
    # text reaches clients that read the final object.
    if "<memory" in seen or "\\u003cmemory" in seen:
        run.blocks += 1
    tags = _TAG.findall(text)
    run.leaks += sum(1 for tag in tags if tag != job.user)
    run.recalled += job.user in tags


def settle_cpu(proc: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    """Wait until the proxy's processes are idle (below a tenth of a core for a second): with
    `--workers`, later workers load their model after the first is ready, and that CPU time is
    not a request's."""
    deadline = time.monotonic() + timeout
    last = tree_cpu_seconds(proc)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = tree_cpu_seconds(proc)
        if now - last < 0.1:
            return
        last = now


def tree_cpu_seconds(proc: subprocess.Popen[bytes] | None) -> float:
    """User + system CPU seconds of a process and its live descendants (the workers)."""
    if proc is None:
        return 0.0
    import psutil

    try:
        root = psutil.Process(proc.pid)
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for member in members:
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def load(direct_url: str, targets: list[Target], fmt: WireFormat, jobs: list[Job], *,
               concurrency: int, stream: bool) -> tuple[Run, dict[str, Run]]:
    """Each job is sent directly and to every target, back to back from one worker, the order
    rotating with the job, by `concurrency` workers: all sides share the machine's load at every
    moment, and each proxied latency has its direct twin (see `added`)."""
    direct = Run()
    runs = {t.name: Run() for t in targets}
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    sides: list[tuple[str, bool, Run]] = [(direct_url, False, direct)] + [
        (t.url, t.headroom, runs[t.name]) for t in targets
    ]
    # Room for every side of every worker, so no side waits for another's connection.
    limits = httpx.Limits(max_connections=len(sides) * concurrency,
                          max_keepalive_connections=len(sides) * concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                job = queue.get_nowait()
                turn = job.n % len(sides)
                for url, headroom, run in sides[turn:] + sides[:turn]:
                    await one(client, url, fmt, job, stream=stream, headroom=headroom, run=run)

        cpu0 = {t.name: tree_cpu_seconds(t.proc) for t in targets}
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        for t in targets:
            runs[t.name].cpu_s = tree_cpu_seconds(t.proc) - cpu0[t.name]
    return direct, runs


def make_jobs(requests: int, *, users: list[str | None], queries: list[str],
              write_share: float, seed: int, fresh: bool) -> list[Job]:
    """`fresh`: every query text is new (a suffix per job), so none hits the proxy's
    query-embedding cache, as a new question would not. A None user: no user header."""
    import random

    rng = random.Random(seed)
    jobs = []
    for n in range(requests):
        user = rng.choice(users)
        query = rng.choice(queries)
        if fresh:
            query += f" (ref {seed % 100000}-{n})"
        jobs.append(Job(n, user, query, user is not None and rng.random() < write_share))
    return jobs


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(list(values), q))


def added(direct: Run, proxied: Run, key: str) -> list[float]:
    """Per pair: the proxied latency minus its own job's direct latency."""
    d, p = getattr(direct, key), getattr(proxied, key)
    return [p[n] - d[n] for n in p if n in d]


def cell_row(direct: Run, proxied: Run, *, stream: bool, concurrency: int,
             **labels: Any) -> dict[str, Any]:
    key = "ttft" if stream else "latencies"
    d, p = list(getattr(direct, key).values()), list(getattr(proxied, key).values())
    diffs = added(direct, proxied, key)
    n = len(p)
    mean_s = float(np.mean(p)) / 1000 if p else float("nan")
    return {
        **labels, "stream": stream, "concurrency": concurrency,
        "direct_p50": pct(d, 50), "direct_p99": pct(d, 99),
        "proxy_p50": pct(p, 50), "proxy_p99": pct(p, 99),
        "added_p50": pct(diffs, 50), "added_p99": pct(diffs, 99),
        "receipt_p50": pct(proxied.receipts, 50),
        "req_per_s": concurrency / mean_s if p else float("nan"),
        "cpu_s_per_1k": proxied.cpu_s / n * 1000 if n else float("nan"),
        "errors": direct.errors + proxied.errors, "blocks": proxied.blocks,
        "error_kinds": {f"{side}: {kind}": count
                        for side, run in (("direct", direct), ("proxied", proxied))
                        for kind, count in run.error_kinds.items()},
        "leaks": proxied.leaks, "recalled": proxied.recalled, "n": n,
        "load1": round(os.getloadavg()[0], 2),
    }


# --- the benchmark ------------------------------------------------------------------------------


def cell_seed(*key: Any) -> int:
    # A seed per cell, and another for its warm-up: repeated queries would hit the
    # query-embedding cache and flatter recall.
    return zlib.crc32(repr(key).encode())


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as `uptime` shows them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return str(machine()["cpu"])


def machine_line() -> str:
    info = machine()
    return (f"{cpu_model()}, {info['nproc']} cores, {info['ram_gb']} GB RAM, Python "
            f"{info['python']}, SQLite {info['sqlite']}, sqlite-vec {info['sqlite_vec']}, "
            f"onnxruntime {info['onnxruntime']}, commit {info['commit']}")


@dataclass(frozen=True)
class Scenario:
    name: str
    users: list[str | None]
    fresh: bool
    write_share: float


def measure_cell(upstream_url: str, targets: list[Target], scenario: Scenario, *,
                 queries: list[str], concurrency: int, requests: int, warm: int,
                 seed: int, stream: bool = False, fmt: str = "chat") -> dict[str, Run]:
    """Warm-up (not measured), then the measured jobs; the runs by target name."""
    common = dict(users=scenario.users, queries=queries, write_share=scenario.write_share,
                  fresh=scenario.fresh)
    if not scenario.fresh:
        # Every repeated query goes through once first: the measured ones are cache hits.
        warm_jobs = [Job(n, scenario.users[0], q, False) for n, q in enumerate(queries)]
    else:
        warm_jobs = make_jobs(warm, seed=seed + 1, **common)
    asyncio.run(load(upstream_url, targets, FORMATS[fmt], warm_jobs, concurrency=concurrency,
                     stream=stream))
    jobs = make_jobs(requests, seed=seed, **common)
    direct, runs = asyncio.run(load(upstream_url, targets, FORMATS[fmt], jobs,
                                    concurrency=concurrency, stream=stream))
    return {"direct": direct, **runs}


def run_heavy(args: argparse.Namespace, upstream_url: str) -> list[dict[str, Any]]:
    """The main table: pass-through, memory on (fresh / repeated queries) for one heavy user
    per store size, and LiteLLM when installed, at each concurrency."""
    sizes = [int(x) for x in args.memories.split(",")]
    levels = [int(x) for x in args.concurrency.split(",")]
    fresh_queries = make_queries(1200, seed=5)
    repeated = make_queries(REPEATED_QUERIES, seed=9)
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                          for k, v in row.items()}), flush=True)

    def measure(targets: list[Target], scenario: Scenario, size: int, c: int,
                queries: list[str]) -> None:
        n = max(args.requests, c * 4)
        seed = cell_seed(size, scenario.name, c)
        runs = measure_cell(upstream_url, targets, scenario, queries=queries, concurrency=c,
                            requests=n, warm=min(n, args.warm), seed=seed)
        for t in targets:
            record(cell_row(runs["direct"], runs[t.name], stream=False, concurrency=c,
                            system=t.name, scenario=scenario.name, memories=size))

    if litellm_available():
        peer, peer_url = start_litellm(upstream_url)
        try:
            for c in levels:
                measure([Target("LiteLLM proxy (no memory)", peer_url, peer, headroom=False)],
                        Scenario("no memory", [None], True, 0.0), 0, c, fresh_queries)
        finally:
            stop(peer)
    else:
        print("LiteLLM peer row skipped: litellm not installed", flush=True)

    for i, size in enumerate(sizes):
        db = build_heavy_store(size, args.pool, rebuild=args.rebuild)
        proxy, proxy_url = start_proxy(upstream_url, db, workers=args.workers)
        settle_cpu(proxy)
        target = [Target("Headroom", proxy_url, proxy)]
        scenarios = [
            Scenario("memory on, fresh queries", [HEAVY_USER], True, args.write_share),
            Scenario("memory on, repeated queries", [HEAVY_USER], False, args.write_share),
        ]
        if i == 0:
            scenarios.insert(0, Scenario("pass-through (no user header)", [None], True, 0.0))
        try:
            for c in levels:
                for scenario in scenarios:
                    queries = fresh_queries if scenario.fresh else repeated
                    measure(target, scenario, size if scenario.users != [None] else 0, c,
                            queries)
        finally:
            stop(proxy)
            shutil.rmtree(db.parent, ignore_errors=True)
    return rows


def run_formats(args: argparse.Namespace, upstream_url: str) -> list[dict[str, Any]]:
    """A table per wire format on one store: memory on (a user with memories, fresh queries)
    and off (no user header), streaming and not, at each concurrency."""
    names = [x.strip() for x in args.formats.split(",") if x.strip()]
    unknown = [x for x in names if x not in FORMATS]
    if unknown:
        raise SystemExit(f"unknown format(s) {unknown}; choose from {sorted(FORMATS)}")
    size = int(args.memories.split(",")[0])
    if size <= 0:
        raise SystemExit("--formats needs a store with memories (--memories > 0)")
    levels = [int(x) for x in args.concurrency.split(",")]
    queries = make_queries(1200, seed=7)
    users: list[str | None] = [f"user-{u:04d}" for u in range(min(args.users, size))]
    rows: list[dict[str, Any]] = []
    db = build_store(size, args.users, args.pool)
    proxy, proxy_url = start_proxy(upstream_url, db, workers=args.workers)
    settle_cpu(proxy)
    target = Target("Headroom", proxy_url, proxy)
    try:
        for name in names:
            for mode in ("off", "on"):
                scenario = Scenario(mode, users if mode == "on" else [None], True,
                                    args.write_share if mode == "on" else 0.0)
                for stream in (False, True):
                    for c in levels:
                        n = max(args.requests, c * 4)
                        runs = measure_cell(upstream_url, [target], scenario, queries=queries,
                                            concurrency=c, requests=n, warm=min(n, args.warm),
                                            seed=cell_seed(name, mode, stream, c),
                                            stream=stream, fmt=name)
                        row = cell_row(runs["direct"], runs[target.name], stream=stream,
                                       concurrency=c, format=name, mode=mode, memories=size)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    finally:
        stop(proxy)
        shutil.rmtree(db.parent, ignore_errors=True)
    return rows


# --- reporting ----------------------------------------------------------------------------------


def _f(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN: no value


_HEAD = "direct p50 | proxied p50 | **added p50** | added p99"


def _cells(r: dict[str, Any]) -> str:
    return (f"{_f(r['direct_p50'])} | {_f(r['proxy_p50'])} | **{_f(r['added_p50'])}** | "
            f"{_f(r['added_p99'])}")


def heavy_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        _HEAVY_START,
        "### Proxy overhead: one heavy user, concurrency, CPU and the receipt (issue 14)",
        "",
        f"Run {meta['date']} on {meta['machine']}. Load average (`uptime`) {meta['load']}. "
        f"Command: `{meta['command']}` ({meta['minutes']:.0f} min).",
        "",
        "Chat completions, non-streaming, fake zero-latency upstream; proxy "
        f"`--workers {meta['workers']}`. Each job goes straight to the upstream and through the "
        "proxy back to back from one load worker (order rotated), and **added** is per pair "
        "(proxied minus its own direct twin; percentiles of those differences). Memory on = "
        f"`{HEAVY_USER}`, the one user with all the store's memories; fresh = a query never "
        f"seen before; repeated = one of {REPEATED_QUERIES} queries already embedded (cache "
        f"hit). {meta['write_share']:.0%} of memory-on answers carry a `<memory>` block (writes "
        "alongside recall). CPU = the proxy processes' user+system seconds per 1,000 proxied "
        "requests (background writes included). Receipt = p50 of `X-Headroom-Memory-Overhead-Ms`"
        " (it cannot see the server's own socket and HTTP parsing). req/s = concurrency / mean "
        "proxied latency. The load generator and the upstream share the cores with the proxy.",
        "",
        f"| system | memories | conc. | {_HEAD} | receipt p50 | CPU s / 1k req | req/s | "
        "recalled | errors | leaks | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["system"] if r["system"] != "Headroom" else f"Headroom, {r['scenario']}"
        lines.append(
            f"| {name} | {r['memories']:,} | {r['concurrency']} | {_cells(r)} | "
            f"{_f(r['receipt_p50'])} | {_f(r['cpu_s_per_1k'], 2)} | {_f(r['req_per_s'], 0)} | "
            f"{r['recalled']}/{r['n']} | {r['errors'] + r['blocks']} | {r['leaks']} | "
            f"{r['load1']:.1f} |"
        )
    lines += ["", *meta["verdicts"], "", _HEAVY_END]
    return "\n".join(lines)


def heavy_verdicts(rows: list[dict[str, Any]]) -> list[str]:
    def find(scenario: str, c: int, memories: int | None = None) -> dict[str, Any] | None:
        return next((r for r in rows if r.get("scenario") == scenario and r["concurrency"] == c
                     and (memories is None or r["memories"] == memories)), None)

    out = []
    off = find("pass-through (no user header)", 1)
    if off:
        out.append(f"- Target, memory off (pass-through), c=1: added p50 ≤ 1.5 ms — measured "
                   f"{off['added_p50']:.1f} ms: **{'met' if off['added_p50'] <= 1.5 else 'not met'}"
                   "**.")
    small = min((r["memories"] for r in rows if r["memories"]), default=None)
    on1 = find("memory on, fresh queries", 1, small)
    if on1:
        out.append(f"- Target, memory on, {small:,} memories, fresh queries, c=1: added p50 ≤ 8 ms "
                   f"— measured {on1['added_p50']:.1f} ms: "
                   f"**{'met' if on1['added_p50'] <= 8 else 'not met'}**.")
        on8 = find("memory on, fresh queries", 8, small)
        if on8:
            ok = on8["added_p50"] <= 3 * on1["added_p50"] and on8["req_per_s"] >= 150
            out.append(f"- Target, c=8: added p50 ≤ 3× the c=1 figure and ≥ 150 req/s with memory "
                       f"on — measured {on8['added_p50']:.1f} ms "
                       f"({on8['added_p50'] / max(on1['added_p50'], 1e-9):.1f}×), "
                       f"{on8['req_per_s']:.0f} req/s: **{'met' if ok else 'not met'}**.")
    receipts = [r for r in rows if r["receipt_p50"] == r["receipt_p50"] and r["concurrency"] == 1]
    if receipts:
        gaps = ", ".join(f"{r['memories']:,}/{r['scenario'].split(', ')[-1]}: "
                         f"{r['receipt_p50']:.1f} vs {r['added_p50']:.1f}" for r in receipts)
        out.append(f"- Receipt p50 vs measured added p50 at c=1 (ms): {gaps}.")
    bad = sum(r["errors"] + r["blocks"] + r["leaks"] for r in rows)
    out.append(f"- Errors, blocks reaching the client, cross-user leaks over all "
               f"{sum(r['n'] for r in rows):,} proxied requests: {bad}.")
    for r in rows:
        for kind, count in r.get("error_kinds", {}).items():
            out.append(f"  - {r['memories']:,} memories, {r['scenario']}, c={r['concurrency']}: "
                       f"{count} × {kind}")
    return out


def formats_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        _FORMATS_START,
        "### Proxy overhead per wire format",
        "",
        f"Run {meta['date']} on {meta['machine']}. Load average (`uptime`) {meta['load']}. "
        f"Command: `{meta['command']}`.",
        "",
        f"One store of {meta['memories']:,} memories over {meta['users']:,} users. Memory on = "
        "a user with stored memories and a query never seen before (no query-embedding cache "
        "hit); memory off = no user header. Direct and proxied requests are interleaved (each "
        "job goes to both, back to back, in rotating order); added = per pair, proxied minus "
        "its own direct twin. Latency in ms: complete answer for non-streaming, time to the "
        f"first text delta for streaming. {meta['write_share']:.0%} of memory-on answers carry "
        "a `<memory>` block; a block reaching the client (in any event, including the final "
        "object) counts in `blocks`. Recalled = proxied answers whose upstream saw one of the "
        "user's own memories.",
    ]
    for name in meta["formats"]:
        lines += ["", f"**{name}** (`POST {FORMATS[name].path}`)", "",
                  f"| memory | stream | conc. | {_HEAD} | receipt p50 | CPU s / 1k req | "
                  "recalled | errors | blocks | leaks |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["format"] == name):
            lines.append(
                f"| {r['mode']} | {'yes' if r['stream'] else 'no'} | {r['concurrency']} | "
                f"{_cells(r)} | {_f(r['receipt_p50'])} | {_f(r['cpu_s_per_1k'], 2)} | "
                f"{r['recalled']}/{r['n']} | {r['errors']} | {r['blocks']} | {r['leaks']} |"
            )
    bad = sum(r["errors"] + r["blocks"] + r["leaks"] for r in rows)
    lines += ["", f"- Errors, blocks reaching the client, cross-user leaks over all "
              f"{sum(r['n'] for r in rows):,} proxied requests: {bad}.", "", _FORMATS_END]
    return "\n".join(lines)


def write_results(section: str, start: str, end: str) -> None:
    """Replace the marked block in RESULTS.md; a new block goes right after the older proxy
    overhead blocks (the same section), else at the end."""
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    elif _FORMATS_END in text:
        head, rest = text.split(_FORMATS_END, 1)
        text = head + _FORMATS_END + "\n\n" + section + rest
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


# --- entry point --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="?", const="chat,responses,messages",
                        help="a table per wire format (alone: chat,responses,messages)")
    parser.add_argument("--memories", help="heavy-user store sizes (default 1000,10000,100000; "
                        "--formats: one store, default 10000)")
    parser.add_argument("--concurrency", help="levels (default 1,8,64; --formats: 1,8)")
    parser.add_argument("--requests", type=int, help="measured per cell (default 300; "
                        "--formats: 200)")
    parser.add_argument("--warm", type=int, default=30, help="warm-up requests per cell")
    parser.add_argument("--workers", type=int, default=1, help="proxy processes (serve "
                        "--workers)")
    parser.add_argument("--users", type=int, default=1000, help="--formats: users in the store")
    parser.add_argument("--pool", type=int, help="distinct real sentences (default 5000; "
                        "--quick: 2000)")
    parser.add_argument("--write-share", type=float, default=0.1)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached stores")
    parser.add_argument("--quick", action="store_true",
                        help="short run: 1k memories, c=1,8, 200 requests per cell (~1 min "
                        "on a quiet machine), RESULTS.md untouched")
    parser.add_argument("--no-write", action="store_true", help="print only, skip RESULTS.md")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        run_upstream(args.serve_upstream)
        return
    if args.quick:
        args.memories = args.memories or "1000"
        args.concurrency = args.concurrency or "1,8"
        args.requests = args.requests or 200
        args.warm = min(args.warm, 20)
        args.pool = args.pool or 2000
        args.no_write = True
    args.memories = args.memories or ("10000" if args.formats else "1000,10000,100000")
    args.concurrency = args.concurrency or ("1,8" if args.formats else "1,8,64")
    args.requests = args.requests or (200 if args.formats else 300)
    args.pool = args.pool or 5000
    started, load_before = time.monotonic(), load_average()
    print(f"{machine_line()}\n{datetime.now(UTC):%Y-%m-%d %H:%M UTC}, load average "
          f"{load_before}", flush=True)
    upstream, upstream_url = start_upstream()
    try:
        rows = (run_formats if args.formats else run_heavy)(args, upstream_url)
    finally:
        stop(upstream)
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_line(),
        "load": f"{load_before} at the start, {load_average()} at the end",
        "minutes": (time.monotonic() - started) / 60,
        "command": "python bench/proxy_overhead.py " + " ".join(sys.argv[1:]),
        "write_share": args.write_share, "workers": args.workers,
        "memories": int(args.memories.split(",")[0]), "users": args.users,
        "formats": [x.strip() for x in (args.formats or "").split(",") if x.strip()],
    }
    if args.formats:
        section, marks = formats_markdown(rows, meta), (_FORMATS_START, _FORMATS_END)
    else:
        meta["verdicts"] = heavy_verdicts(rows)
        section, marks = heavy_markdown(rows, meta), (_HEAVY_START, _HEAVY_END)
    print(section)
    if not args.no_write:
        write_results(section, *marks)
    print(f"took {(time.monotonic() - started) / 60:.1f} min", flush=True)
    failed = [r for r in rows if r["errors"] or r["blocks"] or r["leaks"]]
    if failed:
        raise SystemExit(f"{len(failed)} cell(s) had errors, blocks reaching the client or "
                         "cross-user leaks: see the table")


if __name__ == "__main__":
    main()
