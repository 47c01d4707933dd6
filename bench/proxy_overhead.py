"""Proxy overhead: the same requests sent directly to a zero-latency fake upstream and through the
proxy, in the same run, at several concurrencies, with 0 and 100k stored memories.

    python bench/proxy_overhead.py [--memories 0,100000] [--concurrency 1,16,64]
                                   [--requests 300] [--users 1000] [--write-share 0.1]
    python bench/proxy_overhead.py --formats [chat,responses,messages] [--memories 10000]
                                   [--concurrency 1,8] [--requests 200]

Without `--formats`: chat completions only, over store sizes, memory on/off by the
`X-Headroom-Memory` header. With `--formats` (alone: all three): a table per wire format (chat
completions, OpenAI Responses, Anthropic Messages) on one store, memory on = a user with stored
memories and a fresh query per request, memory off = no user header at all.

Processes: the fake upstream (a raw ASGI app under uvicorn) and the proxy (`proxy.server.serve`,
the real thing: ONNX/torch MiniLM, sqlite-vec, FTS5) each run in their own process; this process
is the load generator (httpx, keep-alive). Reported per scenario: latency p50/p99 of the complete
non-streaming answer and of the streaming time to first content byte, direct and proxied, the
added latency (proxied minus direct, p50 and p99), errors, and cross-user leaks. Direct and
proxied requests are interleaved (each job is sent to both, in alternating order), so both see
the same machine load; a run that is not measured side by side on a shared machine mostly
measures the neighbours.

Leak check: every stored memory ends with its owner's tag `[user-NNNN]`; the fake upstream echoes
the tags it finds in the messages it receives, and the load generator counts any tag that is not
the requesting user's. A share of answers (`--write-share`) carries a `<memory>` block, so writes
(embedding + indexing on the proxy's worker) run alongside recall, as in real traffic; any
`<memory` that reaches the client counts as an error, and any error fails the run.

The fake upstream's Responses and Messages answers are the test suite's builders
(tests/servers.py); chat answers are built here (the suite builds its chat answers inline).

The big store is built through the public `add_many` API with real MiniLM vectors of a pool of
distinct sentences (see store_bench.py: embedding 100k texts here would take most of an hour).
"""

from __future__ import annotations

import argparse
import asyncio
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
_MARK_START = "<!-- proxy_overhead:start -->"
_MARK_END = "<!-- proxy_overhead:end -->"
_FORMATS_START = "<!-- proxy_overhead_formats:start -->"
_FORMATS_END = "<!-- proxy_overhead_formats:end -->"


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


def start_proxy(upstream: str, db: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    code = (
        "from headroom.proxy.server import serve; from headroom.proxy.config import ProxyConfig; "
        f"serve(ProxyConfig(port={port}, upstream_url={upstream!r}, db_path={str(db)!r}, "
        "log_level='warning'))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_for(url + "/readyz", 180)  # the model loads in the background; ready = recall is on
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


# --- the store --------------------------------------------------------------------------------


class TaggedPoolEmbedder(PoolEmbedder):
    """Real vectors of pool sentences, looked up with the `[user-NNNN]` tag stripped."""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return super().embed([_TAG.sub("", t).rstrip() for t in texts])


def build_store(size: int, users: int, pool_size: int) -> Path:
    """A cached database of `size` tagged memories; each run works on a fresh copy."""
    CACHE.mkdir(parents=True, exist_ok=True)
    cached = CACHE / f"proxy-store-{size}-{users}-{pool_size}.db"
    if size and not cached.exists():
        from headroom.memory.hierarchical import HierarchicalMemory
        from headroom.memory.models import MemoryConfig

        embedder = real_embedder("default", 1, cached=False)
        pool = make_memory_pool(pool_size)
        vectors = embed_cached(embedder, [t for _, t in pool], "pool", 64)
        lookup = TaggedPoolEmbedder(embedder.model_id, dict(zip([t for _, t in pool], vectors,
                                                                strict=True)))
        drafts = drafts_for(size, users, pool, seed=11)
        for d in drafts:
            d.content = f"{d.content} [{d.user_id}]"
            d.dedup = False

        async def fill() -> None:
            tmp = cached.with_suffix(".tmp")
            for suffix in ("", "-wal", "-shm"):
                Path(str(tmp) + suffix).unlink(missing_ok=True)
            mem = await HierarchicalMemory.create(MemoryConfig(db_path=tmp), embedder=lookup)
            t0 = time.perf_counter()
            for i in range(0, len(drafts), 500):
                await mem.add_many(drafts[i : i + 500])
            await mem.close()
            print(f"built {size} memories in {time.perf_counter() - t0:.0f}s", flush=True)
            tmp.rename(cached)

        asyncio.run(fill())
    work = Path(tempfile.mkdtemp(prefix="headroom-bench-")) / "memory.db"
    if size:
        shutil.copy(cached, work)
    return work


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
class Run:
    latencies: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    errors: int = 0
    blocks: int = 0  # answers in which `<memory` reached the client
    leaks: int = 0
    recalled: int = 0  # answers that echo one of the user's own memory tags
    wall: float = 0.0


@dataclass(frozen=True)
class Job:
    n: int
    user: str | None  # None: no user header (memory off in the formats mode)
    query: str
    block: bool  # the upstream's answer carries a <memory> block
    mode: str | None  # the X-Headroom-Memory header, if sent


async def one(client: httpx.AsyncClient, url: str, fmt: WireFormat, job: Job, *,
              stream: bool, proxied: bool, run: Run) -> None:
    headers = dict(fmt.headers)
    if proxied and job.user is not None:
        headers["x-headroom-user-id"] = job.user
    if proxied and job.mode is not None:
        headers["x-headroom-memory"] = job.mode
    if proxied and job.block:
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
                    run.errors += 1
                    return
                async for line in response.aiter_lines():
                    raw.append(line)
                    if line.startswith("data: {"):
                        piece = fmt.delta_of(json.loads(line[6:]))
                        if piece and first is None:
                            first = time.perf_counter()
                        text += piece or ""
            run.ttft.append(((first or time.perf_counter()) - t0) * 1000)
            seen = "\n".join(raw)
        else:
            response = await client.post(url + fmt.path, json=body, headers=headers)
            if response.status_code != 200:
                run.errors += 1
                return
            text, seen = fmt.text_of(response.json()), response.text
        run.latencies.append((time.perf_counter() - t0) * 1000)
    except httpx.HTTPError:
        run.errors += 1
        return
    # Every event counts, not only the deltas: a block left in a `done` or `completed` event's
    # text reaches clients that read the final object.
    if "<memory" in seen or "\\u003cmemory" in seen:
        run.blocks += 1
    tags = _TAG.findall(text)
    run.leaks += sum(1 for tag in tags if tag != job.user)
    run.recalled += job.user in tags


async def load(direct_url: str, proxy_url: str, fmt: WireFormat, jobs: list[Job], *,
               concurrency: int, stream: bool) -> tuple[Run, Run]:
    """Each job is sent directly and through the proxy, in alternating order, by `concurrency`
    workers: the two sides share the machine's load at every moment of the run."""
    direct, proxied = Run(), Run()
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    # Room for both sides of every worker's pair, so neither waits for the other's connection.
    limits = httpx.Limits(max_connections=2 * concurrency,
                          max_keepalive_connections=2 * concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def send(job: Job, to_proxy: bool) -> None:
            await one(client, proxy_url if to_proxy else direct_url, fmt, job, stream=stream,
                      proxied=to_proxy, run=proxied if to_proxy else direct)

        async def worker() -> None:
            while not queue.empty():
                job = queue.get_nowait()
                first_to_proxy = job.n % 2 == 1
                await send(job, first_to_proxy)
                await send(job, not first_to_proxy)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        direct.wall = proxied.wall = time.perf_counter() - t0
    return direct, proxied


def make_jobs(requests: int, *, users: int, queries: list[str], write_share: float, seed: int,
              mode: str | None, with_user: bool, fresh: bool) -> list[Job]:
    """`fresh`: every query text is new (a suffix per job), so none hits the proxy's
    query-embedding cache, as a new question would not."""
    import random

    rng = random.Random(seed)
    jobs = []
    for n in range(requests):
        user = f"user-{rng.randrange(users):04d}"
        query = rng.choice(queries)
        if fresh:
            query += f" (ref {seed % 100000}-{n})"
        memory_on = with_user and mode != "off"
        jobs.append(Job(n, user if with_user else None, query,
                        memory_on and rng.random() < write_share, mode))
    return jobs


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(values, q))


# --- the benchmark ------------------------------------------------------------------------------


def scenario_row(size: int, mode: str, stream: bool, c: int, direct: Run, proxied: Run,
                 fmt: str = "chat") -> dict[str, Any]:
    key = "ttft" if stream else "latencies"
    d, p = getattr(direct, key), getattr(proxied, key)
    return {
        "format": fmt, "memories": size, "mode": mode, "stream": stream, "concurrency": c,
        "direct_p50": pct(d, 50), "direct_p99": pct(d, 99),
        "proxy_p50": pct(p, 50), "proxy_p99": pct(p, 99),
        "added_p50": pct(p, 50) - pct(d, 50), "added_p99": pct(p, 99) - pct(d, 99),
        "errors": direct.errors + proxied.errors, "blocks": proxied.blocks,
        "leaks": proxied.leaks, "recalled": proxied.recalled, "n": len(p),
    }


def _cells(r: dict[str, Any]) -> str:
    return (f"{r['direct_p50']:.1f} | {r['direct_p99']:.1f} | {r['proxy_p50']:.1f} | "
            f"{r['proxy_p99']:.1f} | **{r['added_p50']:.1f}** | **{r['added_p99']:.1f}**")


_HEAD = ("direct p50 | direct p99 | proxied p50 | proxied p99 | **added p50** | **added p99**")


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        _MARK_START,
        "## Proxy overhead",
        "",
        f"Run {meta['date']} on {meta['machine']}; load average {meta['load']}. Command: "
        f"`{meta['command']}`.",
        "",
        "Direct = the same request straight to the zero-latency fake upstream; proxied = through "
        "`headroom serve` (real model, sqlite-vec, FTS5), the two interleaved. Latency in ms: "
        "complete answer for non-streaming, time to first content byte (TTFT) for streaming. "
        "Added = proxied − direct at the same percentile. "
        f"{meta['write_share']:.0%} of memory-on answers carry a `<memory>` block, so writes run "
        "alongside recall. The load generator shares the 2 cores with both servers. Recalled = "
        "proxied answers whose upstream saw one of the user's own memories.",
        "",
        f"| memories | memory | stream | conc. | {_HEAD} | recalled | errors | leaks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['memories']:,} | {r['mode']} | {'yes' if r['stream'] else 'no'} | "
            f"{r['concurrency']} | {_cells(r)} | {r['recalled']}/{r['n']} | "
            f"{r['errors'] + r['blocks']} | {r['leaks']} |"
        )
    lines += ["", *meta["verdicts"], "", _MARK_END]
    return "\n".join(lines)


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
        "job goes to both, in alternating order). Latency in ms: complete answer for "
        "non-streaming, time to the first text delta for streaming; added = proxied − direct at "
        f"the same percentile. {meta['write_share']:.0%} of memory-on answers carry a `<memory>` "
        "block; a block reaching the client (in any event, including the final object) counts "
        "in `blocks`. Recalled = proxied answers whose upstream saw one of the user's own "
        "memories.",
    ]
    for name in meta["formats"]:
        lines += ["", f"**{name}** (`POST {FORMATS[name].path}`)", "",
                  f"| memory | stream | conc. | {_HEAD} | recalled | errors | blocks | leaks |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["format"] == name):
            lines.append(
                f"| {r['mode']} | {'yes' if r['stream'] else 'no'} | {r['concurrency']} | "
                f"{_cells(r)} | {r['recalled']}/{r['n']} | {r['errors']} | {r['blocks']} | "
                f"{r['leaks']} |"
            )
    lines += ["", *meta["notes"], "", _FORMATS_END]
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]], sizes: list[int]) -> list[str]:
    out = []
    big = max(sizes)

    def find(**kw: Any) -> dict[str, Any] | None:
        return next((r for r in rows if all(r[k] == v for k, v in kw.items())), None)

    on = find(memories=big, mode="on", stream=False, concurrency=1)
    if on:
        ok = on["added_p50"] <= 20 and on["added_p99"] <= 60
        out.append(f"- Target, concurrency 1, recall on, {big:,} memories: added p50 ≤ 20 ms and "
                   f"p99 ≤ 60 ms — measured {on['added_p50']:.1f} / {on['added_p99']:.1f} ms: "
                   f"**{'met' if ok else 'not met'}**.")
    off = find(memories=big, mode="off", stream=False, concurrency=1)
    if off:
        out.append(f"- Target, memory off: added p50 ≤ 3 ms — measured {off['added_p50']:.1f} ms: "
                   f"**{'met' if off['added_p50'] <= 3 else 'not met'}**.")
    c64 = [r for r in rows if r["concurrency"] == 64]
    if c64:
        bad = sum(r["errors"] + r["leaks"] for r in c64)
        out.append(f"- Target, concurrency 64: no error and no cross-user leak — "
                   f"{sum(r['errors'] for r in c64)} errors, {sum(r['leaks'] for r in c64)} "
                   f"leaks: **{'met' if bad == 0 else 'not met'}**.")
    out.append("- Anchors: LiteLLM's published proxy overhead 12 ms p50 / 43 ms p99; Mem0's search "
               "alone 148 ms p50.")
    return out


def write_results(section: str, start: str = _MARK_START, end: str = _MARK_END) -> None:
    """Replace the marked block in RESULTS.md; a new per-format block goes right after the
    chat table's block (the same section), anything else at the end."""
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    elif start == _FORMATS_START and _MARK_END in text:
        head, rest = text.split(_MARK_END, 1)
        text = head + _MARK_END + "\n\n" + section + rest
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


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


def cell_seed(*key: Any) -> int:
    # A seed per cell, and another for its warm-up: repeated queries would hit the
    # query-embedding cache and flatter recall.
    return zlib.crc32(repr(key).encode())


def run_chat_grid(args: argparse.Namespace, upstream_url: str) -> list[dict[str, Any]]:
    """The original benchmark: chat completions over store sizes, memory by header."""
    sizes = [int(x) for x in (args.memories or "0,100000").split(",")]
    levels = [int(x) for x in (args.concurrency or "1,16,64").split(",")]
    # Many distinct queries (the templates allow ~1.2k): scenarios draw ~250 each, so most
    # are unseen and miss the query-embedding cache, as new questions do.
    queries = make_queries(1200, seed=5)
    chat = FORMATS["chat"]
    rows: list[dict[str, Any]] = []
    for size in sizes:
        db = build_store(size, args.users, args.pool)
        proxy, proxy_url = start_proxy(upstream_url, db)
        try:
            for mode in ("off", "on"):
                for stream in (False, True):
                    for c in levels:
                        n = max(args.requests or 300, c * 4)
                        seed = cell_seed(size, mode, stream, c)
                        common = dict(users=args.users, queries=queries,
                                      write_share=args.write_share, mode=mode, with_user=True,
                                      fresh=False)
                        warm = make_jobs(min(n, 50), seed=seed + 1, **common)
                        asyncio.run(load(upstream_url, proxy_url, chat, warm, concurrency=c,
                                         stream=stream))
                        jobs = make_jobs(n, seed=seed, **common)
                        direct, proxied = asyncio.run(load(upstream_url, proxy_url, chat, jobs,
                                                           concurrency=c, stream=stream))
                        row = scenario_row(size, mode, stream, c, direct, proxied)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        finally:
            stop(proxy)
            shutil.rmtree(db.parent, ignore_errors=True)
    load_now = load_average()
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_line(),
        "load": load_now, "command": "python bench/proxy_overhead.py " + " ".join(sys.argv[1:]),
        "write_share": args.write_share, "verdicts": verdicts(rows, sizes),
    }
    section = markdown(rows, meta)
    print(section)
    if not args.no_write:
        write_results(section)
    return rows


def run_formats(args: argparse.Namespace, upstream_url: str) -> list[dict[str, Any]]:
    """A table per wire format on one store: memory on (a user with memories, fresh queries)
    and off (no user header), streaming and not, at each concurrency."""
    names = [x.strip() for x in args.formats.split(",") if x.strip()]
    unknown = [x for x in names if x not in FORMATS]
    if unknown:
        raise SystemExit(f"unknown format(s) {unknown}; choose from {sorted(FORMATS)}")
    size = int(args.memories or "10000")
    if size <= 0:
        raise SystemExit("--formats needs a store with memories (--memories > 0)")
    levels = [int(x) for x in (args.concurrency or "1,8").split(",")]
    requests = args.requests or 200
    queries = make_queries(1200, seed=7)
    load_before = load_average()
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    db = build_store(size, args.users, args.pool)
    proxy, proxy_url = start_proxy(upstream_url, db)
    try:
        for name in names:
            for mode in ("off", "on"):
                for stream in (False, True):
                    for c in levels:
                        n = max(requests, c * 4)
                        seed = cell_seed(name, mode, stream, c)
                        common = dict(users=args.users, queries=queries,
                                      write_share=args.write_share, mode=None,
                                      with_user=mode == "on", fresh=True)
                        warm = make_jobs(min(n, 30), seed=seed + 1, **common)
                        asyncio.run(load(upstream_url, proxy_url, FORMATS[name], warm,
                                         concurrency=c, stream=stream))
                        jobs = make_jobs(n, seed=seed, **common)
                        direct, proxied = asyncio.run(load(
                            upstream_url, proxy_url, FORMATS[name], jobs, concurrency=c,
                            stream=stream))
                        row = scenario_row(size, mode, stream, c, direct, proxied, fmt=name)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    finally:
        stop(proxy)
        shutil.rmtree(db.parent, ignore_errors=True)
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_line(),
        "load": f"{load_before} at the start, {load_average()} at the end "
                f"({(time.monotonic() - t0) / 60:.0f} min)",
        "command": "python bench/proxy_overhead.py " + " ".join(sys.argv[1:]),
        "memories": size, "users": args.users, "write_share": args.write_share,
        "formats": names, "notes": format_notes(rows, names),
    }
    section = formats_markdown(rows, meta)
    print(section)
    if not args.no_write:
        write_results(section, _FORMATS_START, _FORMATS_END)
    return rows


def format_notes(rows: list[dict[str, Any]], names: list[str]) -> list[str]:
    """Per format, the concurrency-1 added p50 with memory on and off, side by side."""
    out = []
    for stream in (False, True):
        cells = []
        for name in names:
            on = next((r for r in rows if r["format"] == name and r["mode"] == "on"
                       and r["stream"] == stream and r["concurrency"] == 1), None)
            off = next((r for r in rows if r["format"] == name and r["mode"] == "off"
                        and r["stream"] == stream and r["concurrency"] == 1), None)
            if on and off:
                cells.append(f"{name} {on['added_p50']:.1f} / {off['added_p50']:.1f}")
        if cells:
            kind = "streaming (TTFT)" if stream else "non-streaming"
            out.append(f"- Concurrency 1, {kind}, added p50 memory on / off (ms): "
                       + "; ".join(cells) + ".")
    bad = sum(r["errors"] + r["blocks"] + r["leaks"] for r in rows)
    out.append(f"- Errors, blocks reaching the client, cross-user leaks over all "
               f"{sum(r['n'] for r in rows):,} proxied requests: {bad}.")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="?", const="chat,responses,messages",
                        help="a table per wire format (alone: chat,responses,messages)")
    parser.add_argument("--memories", help="store sizes (default 0,100000; --formats: 10000)")
    parser.add_argument("--concurrency", help="levels (default 1,16,64; --formats: 1,8)")
    parser.add_argument("--requests", type=int, help="per cell (default 300; --formats: 200)")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=5000)
    parser.add_argument("--write-share", type=float, default=0.1)
    parser.add_argument("--no-write", action="store_true", help="print only, skip RESULTS.md")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        run_upstream(args.serve_upstream)
        return
    upstream, upstream_url = start_upstream()
    try:
        if args.formats:
            rows = run_formats(args, upstream_url)
        else:
            rows = run_chat_grid(args, upstream_url)
    finally:
        stop(upstream)
    failed = [r for r in rows if r["errors"] or r["blocks"] or r["leaks"]]
    if failed:
        raise SystemExit(f"{len(failed)} cell(s) had errors, blocks reaching the client or "
                         "cross-user leaks: see the table")


if __name__ == "__main__":
    main()
