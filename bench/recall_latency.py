"""Recall latency on an existing store, excluding the query embedding, per preset.

    python bench/recall_latency.py --db bench/.cache/store-100000.db [--queries 300]
                                   [--presets default,learned-turns,common] [--quick]

The store is one `bench/store_bench.py --sizes 100000` builds (bench/.cache/store-100000.db:
100k memories over 1,000 users, real MiniLM vectors of its sentence pool). Query vectors are
computed first, so no timing includes the model. Per preset, after 30 warm-up queries, each
query for a random user is timed three ways:
- `recall()` as the proxy calls it (top_k 5, token budget 800, the core tier beside it), its
  query embedding a cache hit (every query was recalled once before timing), so what is left
  is the search, ranking and core tier the proxy waits for;
- `hybrid_search(query_vector=...)` awaited plus the core tier's read, one after the other;
- `Retrieval._ranked` alone on the reader thread with its returned top 5 built (wall and
  thread-CPU time; the CPU time is what other processes on a shared machine inflate least).
`--quick`: 60 queries, the default preset only (a smoke run of a few seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import random
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from store_bench import make_queries  # noqa: E402

from headroom.memory import HierarchicalMemory, MemoryConfig  # noqa: E402
from headroom.memory.models import Scope, utcnow  # noqa: E402
from headroom.memory.recall import RecallPreset, get_preset  # noqa: E402

WARM_UP = 30


def time_ranking(
    retrieval: Any, query: str, user: str, vector: Any, preset: RecallPreset
) -> tuple[float, float]:
    """Wall and thread-CPU seconds of the ranking path alone (on the calling thread), with the
    memories of its top 5 built, as `hybrid_search` returns them."""
    common = retrieval._common_terms(query, user, preset)
    w0, c0 = time.perf_counter(), time.thread_time()
    retrieval._ranked(query, Scope(user), 5, None, utcnow(), preset, vector, common).top(5)
    return time.perf_counter() - w0, time.thread_time() - c0


def p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def run(db: str, n: int, presets: list[str]) -> None:
    users = [u for (u,) in sqlite3.connect(db).execute("SELECT DISTINCT user_id FROM memories")]
    rng = random.Random(5)
    queries = make_queries(n, seed=11)
    picks = [rng.choice(users) for _ in queries]
    mem = await HierarchicalMemory.create(MemoryConfig(db_path=db, embedder_runtime="onnx"))
    try:
        vectors = [await mem.embed_query(q) for q in queries]
        retrieval = mem._retrieval
        print(f"{len(users)} users; load {os.getloadavg()[0]:.1f}")
        print("| preset | recall() p50 / p99 ms | hybrid + core p50 / p99 ms "
              "| ranking wall p50 ms | ranking CPU p50 ms |")
        print("|---|---|---|---|---|")
        for name in presets:
            preset = get_preset(name)
            asks = list(zip(queries, picks, vectors, strict=True))
            for q, u, _ in asks:  # every query's embedding into the query cache
                await mem.recall(q, u, top_k=5, token_budget=800, touch=False, preset=preset)
            for q, u, v in asks[:WARM_UP]:
                await mem.hybrid_search(q, u, top_k=5, preset=preset, query_vector=v)
            recall: list[float] = []
            full: list[float] = []
            wall: list[float] = []
            cpu: list[float] = []
            for q, u, v in asks:
                t0 = time.perf_counter()
                await mem.recall(q, u, top_k=5, token_budget=800, touch=False, preset=preset)
                recall.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                await mem.hybrid_search(q, u, top_k=5, preset=preset, query_vector=v)
                await retrieval.core_memories(Scope(u))
                full.append((time.perf_counter() - t0) * 1000)
                w, c = await retrieval.executors.read(
                    functools.partial(time_ranking, retrieval, q, u, v, preset)
                )
                wall.append(w * 1000)
                cpu.append(c * 1000)
            print(f"| `{name}` | {statistics.median(recall):.2f} / {p(recall, 99):.2f} | "
                  f"{statistics.median(full):.2f} / {p(full, 99):.2f} | "
                  f"{statistics.median(wall):.2f} | {statistics.median(cpu):.2f} |", flush=True)
        print(f"load {os.getloadavg()[0]:.1f}")
    finally:
        await mem.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", default=str(ROOT / "bench" / ".cache" / "store-100000.db"))
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--presets", default="default,learned-turns,common")
    parser.add_argument("--quick", action="store_true",
                        help="60 queries, the default preset only (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.queries, args.presets = 60, "default"
    if not Path(args.db).exists():
        raise SystemExit(f"{args.db} does not exist: build it with bench/store_bench.py")
    asyncio.run(run(args.db, args.queries, args.presets.split(",")))


if __name__ == "__main__":
    main()
