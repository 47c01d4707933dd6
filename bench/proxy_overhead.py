"""Proxy overhead: the same requests sent directly to a zero-latency fake upstream and through the
proxy, in the same run, at several concurrencies, with 0 and 100k stored memories.

    python bench/proxy_overhead.py [--memories 0,100000] [--concurrency 1,16,64]
                                   [--requests 300] [--users 1000] [--write-share 0.1]

Processes: the fake upstream (a raw ASGI app under uvicorn) and the proxy (`proxy.server.serve`,
the real thing: ONNX/torch MiniLM, sqlite-vec, FTS5) each run in their own process; this process
is the load generator (httpx, keep-alive). Reported per scenario: latency p50/p99 of the complete
non-streaming answer and of the streaming time to first content byte, direct and proxied, the
added latency (proxied minus direct, p50 and p99), requests/s, errors, and cross-user leaks.

Leak check: every stored memory ends with its owner's tag `[user-NNNN]`; the fake upstream echoes
the tags it finds in the messages it receives, and the load generator counts any tag that is not
the requesting user's. A share of answers (`--write-share`) carries a `<memory>` block, so writes
(embedding + indexing on the proxy's worker) run alongside recall, as in real traffic.

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
from collections.abc import Sequence
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

_TAG = re.compile(r"\[(user-\d{4})\]")
_MARK_START = "<!-- proxy_overhead:start -->"
_MARK_END = "<!-- proxy_overhead:end -->"


# --- the zero-latency fake upstream (its own process) ---------------------------------------------


def _completion(text: str, model: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }).encode()


def _chunks(text: str, model: str) -> list[bytes]:
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
            "model": model}
    pieces = [text[i : i + 8] for i in range(0, len(text), 8)]
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}]
    events += [{**base, "choices": [{"index": 0, "delta": {"content": p},
                                     "finish_reason": None}]} for p in pieces]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


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
    text_in = json.dumps(request.get("messages", []))
    tags = sorted(set(_TAG.findall(text_in)))
    headers = dict(scope["headers"])
    answer = "ok " + ",".join(tags)
    if headers.get(b"x-bench-block") == b"1":
        n = headers.get(b"x-bench-n", b"0").decode()
        answer += f' <memory>{{"add":[{{"text":"bench fact {n}","category":"fact"}}]}}</memory>'
    model = request.get("model", "bench")
    if request.get("stream"):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for chunk in _chunks(answer, model):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    payload = _completion(answer, model)
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


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    errors: int = 0
    leaks: int = 0
    wall: float = 0.0


async def one(client: httpx.AsyncClient, url: str, user: str, query: str, *, stream: bool,
              proxied: bool, mode: str, block: bool, n: int, run: Run) -> None:
    headers = {"authorization": "Bearer bench"}
    if proxied:
        headers |= {"x-headroom-user-id": user, "x-headroom-memory": mode}
    if block:
        headers |= {"x-bench-block": "1", "x-bench-n": str(n)}
    body = {"model": "bench", "stream": stream,
            "messages": [{"role": "user", "content": query}]}
    t0 = time.perf_counter()
    try:
        if stream:
            text = ""
            first: float | None = None
            async with client.stream("POST", url + "/v1/chat/completions", json=body,
                                     headers=headers) as response:
                if response.status_code != 200:
                    run.errors += 1
                    return
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"]
                        piece = delta[0]["delta"].get("content") if delta else None
                        if piece and first is None:
                            first = time.perf_counter()
                        text += piece or ""
            run.ttft.append(((first or time.perf_counter()) - t0) * 1000)
        else:
            response = await client.post(url + "/v1/chat/completions", json=body,
                                         headers=headers)
            if response.status_code != 200:
                run.errors += 1
                return
            text = response.json()["choices"][0]["message"]["content"]
        run.latencies.append((time.perf_counter() - t0) * 1000)
    except httpx.HTTPError:
        run.errors += 1
        return
    if "<memory>" in text:
        run.errors += 1  # a block reached the client
    run.leaks += sum(1 for tag in _TAG.findall(text) if tag != user)


async def load(url: str, *, concurrency: int, requests: int, users: int, queries: list[str],
               stream: bool, proxied: bool, mode: str, write_share: float, seed: int) -> Run:
    import random

    rng = random.Random(seed)
    jobs = [(f"user-{rng.randrange(users):04d}", rng.choice(queries), rng.random() < write_share)
            for _ in range(requests)]
    run = Run()
    queue: asyncio.Queue[tuple[int, tuple[str, str, bool]]] = asyncio.Queue()
    for item in enumerate(jobs):
        queue.put_nowait(item)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                n, (user, query, block) = queue.get_nowait()
                await one(client, url, user, query, stream=stream, proxied=proxied, mode=mode,
                          block=block and proxied and mode == "on", n=n, run=run)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.wall = time.perf_counter() - t0
    return run


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(values, q))


# --- the benchmark ------------------------------------------------------------------------------


def scenario_row(size: int, mode: str, stream: bool, c: int, direct: Run, proxied: Run
                 ) -> dict[str, Any]:
    key = "ttft" if stream else "latencies"
    d, p = getattr(direct, key), getattr(proxied, key)
    return {
        "memories": size, "mode": mode, "stream": stream, "concurrency": c,
        "direct_p50": pct(d, 50), "direct_p99": pct(d, 99),
        "proxy_p50": pct(p, 50), "proxy_p99": pct(p, 99),
        "added_p50": pct(p, 50) - pct(d, 50), "added_p99": pct(p, 99) - pct(d, 99),
        "direct_rps": len(direct.latencies) / direct.wall if direct.wall else 0.0,
        "proxy_rps": len(proxied.latencies) / proxied.wall if proxied.wall else 0.0,
        "errors": direct.errors + proxied.errors, "leaks": proxied.leaks,
        "n": len(p),
    }


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        _MARK_START,
        "## Proxy overhead",
        "",
        f"Run {meta['date']} on {meta['machine']}. Command: `{meta['command']}`.",
        "",
        "Direct = the same request straight to the zero-latency fake upstream; proxied = through "
        "`headroom serve` (real model, sqlite-vec, FTS5). Latency in ms: complete answer for "
        "non-streaming, time to first content byte (TTFT) for streaming. Added = proxied − direct "
        f"at the same percentile. {meta['write_share']:.0%} of memory-on answers carry a "
        "`<memory>` block, so writes run alongside recall. The load generator shares the 2 cores "
        "with both servers.",
        "",
        "| memories | memory | stream | conc. | direct p50 | direct p99 | proxied p50 | proxied "
        "p99 | **added p50** | **added p99** | direct req/s | proxied req/s | errors | leaks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['memories']:,} | {r['mode']} | {'yes' if r['stream'] else 'no'} | "
            f"{r['concurrency']} | {r['direct_p50']:.1f} | {r['direct_p99']:.1f} | "
            f"{r['proxy_p50']:.1f} | {r['proxy_p99']:.1f} | **{r['added_p50']:.1f}** | "
            f"**{r['added_p99']:.1f}** | {r['direct_rps']:.0f} | {r['proxy_rps']:.0f} | "
            f"{r['errors']} | {r['leaks']} |"
        )
    lines += ["", *meta["verdicts"], "", _MARK_END]
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


def write_results(section: str) -> None:
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if _MARK_START in text and _MARK_END in text:
        head, rest = text.split(_MARK_START, 1)
        text = head + section + rest.split(_MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memories", default="0,100000")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=5000)
    parser.add_argument("--write-share", type=float, default=0.1)
    parser.add_argument("--no-write", action="store_true", help="print only, skip RESULTS.md")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        run_upstream(args.serve_upstream)
        return
    sizes = [int(x) for x in args.memories.split(",")]
    levels = [int(x) for x in args.concurrency.split(",")]
    # Many distinct queries (the templates allow ~1.2k): scenarios draw ~250 each, so most
    # are unseen and miss the query-embedding cache, as new questions do.
    queries = make_queries(1200, seed=5)
    rows: list[dict[str, Any]] = []
    upstream, upstream_url = start_upstream()
    try:
        for size in sizes:
            db = build_store(size, args.users, args.pool)
            proxy, proxy_url = start_proxy(upstream_url, db)
            try:
                for mode in ("off", "on"):
                    for stream in (False, True):
                        for c in levels:
                            n = max(args.requests, c * 4)
                            # A seed per scenario, and another for the warm-up: repeated
                            # queries would hit the query-embedding cache and flatter recall.
                            seed = zlib.crc32(repr((size, mode, stream, c)).encode())
                            common = dict(concurrency=c, requests=n, users=args.users,
                                          queries=queries, stream=stream, mode=mode,
                                          write_share=args.write_share, seed=seed)
                            warm = {**common, "requests": min(n, 50), "seed": seed + 1}
                            asyncio.run(load(proxy_url, **warm, proxied=True))
                            direct = asyncio.run(load(upstream_url, proxied=False, **common))
                            proxied = asyncio.run(load(proxy_url, proxied=True, **common))
                            row = scenario_row(size, mode, stream, c, direct, proxied)
                            rows.append(row)
                            print(json.dumps(row), flush=True)
            finally:
                stop(proxy)
                shutil.rmtree(db.parent, ignore_errors=True)
    finally:
        stop(upstream)
    info = machine()
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{info['cpu']}, {info['nproc']} cores, {info['ram_gb']} GB RAM, "
                   f"Python {info['python']}, SQLite {info['sqlite']}, sqlite-vec "
                   f"{info['sqlite_vec']}, onnxruntime {info['onnxruntime']}, commit "
                   f"{info['commit']}",
        "command": "python bench/proxy_overhead.py " + " ".join(sys.argv[1:]),
        "write_share": args.write_share,
        "verdicts": verdicts(rows, sizes),
    }
    section = markdown(rows, meta)
    print(section)
    if not args.no_write:
        write_results(section)


if __name__ == "__main__":
    main()
