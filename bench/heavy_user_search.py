"""Heavy-user search benchmark: one user with 1k / 10k / 100k memories (issue 14).

    python bench/heavy_user_search.py [--sizes 1000,10000,100000] [--queries 300] [--quick]

For each size, one store holds that many memories of one user (plus a few small users, so
the file is not a one-user toy), built through the public `add_many` and cached under
bench/.cache. Then, over `--queries` distinct queries (half at user scope, half inside a
session), after a warm-up:

- `vectors.search` at the depth recall asks for (the preset's `vector_depth`) and at k=10:
  latency, and top-10 / top-depth agreement with an exact cosine over the user's stored
  embeddings read from the `memories` table (the ground truth, independent of the index);
- `text.search` (BM25) at the preset's `text_depth`;
- `hybrid_search(..., query_vector=...)`: vector + full text + fusion + ranking, i.e. recall's
  own cost with the query embedding excluded;
- `recall(...)` with the query embedding a cache hit (each query was embedded once during the
  warm-up), i.e. what the proxy's recall costs besides the model;
- as references, the same file searched without the per-process in-memory copies
  (`cache=False`: FTS5 scoring, sqlite-vec / heavy-tier vectors), i.e. the cost before them,
  and the top-10 agreement of the cached BM25 with FTS5's bm25 on the same queries, plus how
  long reading the process's copy of the user took (`warm`; without it, a heavy user's first
  search starts that read on a background thread and the file answers until it is done).

Latencies are wall time and thread CPU time (the synchronous index calls) or process CPU time
(the awaited calls, which run on a pool thread): the machine is shared, and CPU time is what
other processes inflate least. Load averages are printed next to each size.

Vectors are real all-MiniLM-L6-v2 embeddings of distinct sentences (`store_bench`'s templates),
embedded once in chunks of 10k and cached. With `--real N` below the largest size, only N
sentences are embedded and each further memory is two of them joined ("A; b"), with the vector
the token-weighted mean of theirs, renormalised: MiniLM mean-pools its token states, so that is
close to the embedding of the joined text, and it keeps the vectors on the real manifold (random
Gaussian vectors would flatter or wreck sign quantization, neither of which says anything).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from store_bench import (  # noqa: E402
    CACHE,
    PoolEmbedder,
    embed_cached,
    machine,
    make_memory_pool,
    make_queries,
    real_embedder,
)

from headroom.memory import HierarchicalMemory, MemoryConfig, MemoryDraft  # noqa: E402
from headroom.memory.adapters import FTS5TextIndex, SqliteVecIndex  # noqa: E402
from headroom.memory.adapters.fts5_index import fts_terms, user_token  # noqa: E402
from headroom.memory.models import Scope, utcnow  # noqa: E402
from headroom.memory.recall import clean_query  # noqa: E402

HEAVY = "heavy-user"
SMALL_USERS = 20
SMALL_EACH = 50
EMBED_CHUNK = 10_000
TARGET_HYBRID_P50_MS = 8.0
TARGET_TEXT_P50_MS = 3.0
TARGET_AGREEMENT = 0.98
TARGET_VECTOR_P50_MS = 2.0
TARGET_BM25_AGREEMENT = 0.95


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


# --- data -----------------------------------------------------------------------------------


def real_vectors(embedder: Any, texts: list[str]) -> np.ndarray:
    """Embeddings of `texts`, cached per chunk of 10k so a larger run reuses a smaller one's."""
    parts = []
    for start in range(0, len(texts), EMBED_CHUNK):
        t0 = time.perf_counter()
        parts.append(embed_cached(embedder, texts[start : start + EMBED_CHUNK], "heavy-pool", 128))
        took = time.perf_counter() - t0
        if took > 1.0:
            print(f"  embedded {start + len(parts[-1]):,} of {len(texts):,} sentences "
                  f"({took:.0f} s for this chunk, load {load()})", flush=True)
    return np.concatenate(parts).astype(np.float32)


def memories_for(
    size: int, sentences: list[tuple[str, str]], vectors: np.ndarray, seed: int
) -> list[tuple[str, str, np.ndarray]]:
    """`size` distinct (category, text, vector): the real sentences first, then joined pairs."""
    out = [(c, t, vectors[i]) for i, (c, t) in enumerate(sentences[:size])]
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    n = len(sentences)
    while len(out) < size:
        a, b = rng.randrange(n), rng.randrange(n)
        if a == b or (a, b) in seen:
            continue
        seen.add((a, b))
        (cat, ta), (_, tb) = sentences[a], sentences[b]
        wa, wb = len(ta.split()), len(tb.split())
        v = wa * vectors[a] + wb * vectors[b]
        v = (v / np.linalg.norm(v)).astype(np.float32)
        out.append((cat, f"{ta}; {tb[0].lower()}{tb[1:]}", v))
    return out


def drafts_for(
    memories: list[tuple[str, str, np.ndarray]], small: list[tuple[str, str, np.ndarray]],
    seed: int,
) -> list[MemoryDraft]:
    """The heavy user's memories (~70% user scope, the rest in one of three sessions, ages over
    a year, ~1% of importance 0.9) interleaved with `SMALL_USERS` users of `SMALL_EACH`
    memories each."""
    rng = random.Random(seed)
    now = utcnow()

    def draft(cat: str, text: str, user: str) -> MemoryDraft:
        session = f"s{rng.randrange(3)}" if rng.random() < 0.3 else None
        return MemoryDraft(
            text, user, session_id=session, category=cat,
            # ~1% core-tier memories (importance >= 0.85), as a model rates health or diet
            importance=0.9 if rng.random() < 0.01 else round(rng.uniform(0.2, 0.8), 2),
            created_at=now - timedelta(days=rng.uniform(0, 365)), dedup=False,
        )

    drafts = [draft(c, t, HEAVY) for c, t, _ in memories]
    for u in range(SMALL_USERS):
        drafts += [draft(c, t, f"small-{u:02d}") for c, t, _ in
                   small[u * SMALL_EACH : (u + 1) * SMALL_EACH]]
    rng.shuffle(drafts)
    return drafts


async def build(path: Path, drafts: list[MemoryDraft], embedder: PoolEmbedder) -> float:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    t0 = time.perf_counter()
    mem = await HierarchicalMemory.create(MemoryConfig(db_path=path), embedder=embedder)
    try:
        for i in range(0, len(drafts), 500):
            await mem.add_many(drafts[i : i + 500])
        await mem.optimize()
    finally:
        await mem.close()
    return time.perf_counter() - t0


# --- measuring ------------------------------------------------------------------------------


@dataclass
class Timing:
    name: str
    ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)

    def p(self, q: float, cpu: bool = False) -> float:
        return float(np.percentile(self.cpu_ms if cpu else self.ms, q))


def time_sync(name: str, fn: Callable[[int], Any], n: int) -> Timing:
    out = Timing(name)
    for i in range(n):
        c0, t0 = time.thread_time(), time.perf_counter()
        fn(i)
        out.ms.append((time.perf_counter() - t0) * 1000)
        out.cpu_ms.append((time.thread_time() - c0) * 1000)
    return out


async def time_async(name: str, fn: Callable[[int], Awaitable[Any]], n: int) -> Timing:
    out = Timing(name)
    for i in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        await fn(i)
        out.ms.append((time.perf_counter() - t0) * 1000)
        out.cpu_ms.append((time.process_time() - c0) * 1000)
    return out


def exact_top(
    query: np.ndarray, rowids: np.ndarray, matrix: np.ndarray, allowed: np.ndarray, k: int
) -> list[int]:
    sims = np.where(allowed, matrix @ query, -np.inf)  # no copy of the matrix per query
    top = np.argpartition(-sims, k)[:k] if k < len(sims) else np.arange(len(sims))
    top = top[np.argsort(-sims[top], kind="stable")]
    return rowids[top[np.isfinite(sims[top])]].tolist()


def text_matches(conn: Any, query: str, stop_words: frozenset[str]) -> int:
    """How many of the heavy user's rows a full-text query matches. bm25() scores every match
    before the LIMIT applies, so this count, not the user's size, sets text.search's cost."""
    terms = fts_terms(query, stop_words)
    if not terms:
        return 0
    words = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
    match = f"user_key:{user_token(HEAVY)} AND content:({words})"
    return int(conn.execute(
        "SELECT count(*) FROM memories_fts WHERE memories_fts MATCH ?", (match,)
    ).fetchone()[0])


def agreement(found: Sequence[Sequence[int]], exact: Sequence[Sequence[int]]) -> float:
    """Mean share of the exact top-k that the index returned."""
    return statistics.fmean(
        len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True) if e
    )


async def measure(
    path: Path, size: int, queries: list[str], qvecs: np.ndarray, query_embedder: Any,
) -> dict[str, Any]:
    mem = await HierarchicalMemory.create(MemoryConfig(db_path=path), embedder=query_embedder)
    try:
        preset = mem.preset
        conn = mem.store.db.conn  # type: ignore[attr-defined]
        rows = conn.execute(
            "SELECT rid, session_id, agent_id, turn_id, embedding FROM memories"
            " WHERE user_id = ? AND valid_until IS NULL", (HEAVY,),
        ).fetchall()
        rowids = np.array([r[0] for r in rows], dtype=np.int64)
        sessions = np.array([r[1] or "" for r in rows])
        matrix = np.stack([np.frombuffer(r[4], dtype=np.float32) for r in rows])
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        rng = random.Random(size)
        n = len(queries)
        scopes = [Scope(HEAVY, f"s{rng.randrange(3)}" if rng.random() < 0.5 else None)
                  for _ in range(n)]
        allowed = [(sessions == "") | (sessions == (s.session_id or "")) for s in scopes]
        keys = [s.visible_keys() for s in scopes]
        depth_v, depth_t = max(preset.vector_depth, 10), max(preset.text_depth, 10)

        def vsearch(i: int, k: int) -> list[tuple[int, float]]:
            return mem.vectors.search(qvecs[i], HEAVY, scope_keys=keys[i], categories=None, k=k)

        def tsearch(i: int) -> list[tuple[int, float]]:
            return mem.text.search(clean_query(queries[i], preset), HEAVY, scope_keys=keys[i],
                                   categories=None, k=depth_t)

        def hybrid(i: int) -> Awaitable[Any]:
            s = scopes[i]
            return mem.hybrid_search(queries[i], HEAVY, s.session_id, top_k=10,
                                     query_vector=qvecs[i])

        def recall(i: int) -> Awaitable[Any]:
            return mem.recall(queries[i], HEAVY, scopes[i].session_id, top_k=10, touch=False)

        # the same file without the in-memory copies: what every search cost before them
        db = mem.text.db  # type: ignore[attr-defined]
        file_text = FTS5TextIndex(db, mem.text.stop_words, cache=False)  # type: ignore[attr-defined]
        file_vectors = SqliteVecIndex(db, mem.vectors.dimension, cache=False)

        def first_ms(fn: Callable[[], Any]) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1000

        # the process's in-memory copies of the user, read now (a heavy user's are otherwise
        # read on a background thread at the first search while the file answers)
        build_v = first_ms(lambda: mem.vectors.warm(HEAVY))  # type: ignore[attr-defined]
        build_t = first_ms(lambda: mem.text.warm(HEAVY))  # type: ignore[attr-defined]

        def fts5_search(i: int) -> list[tuple[int, float]]:
            return file_text.search(clean_query(queries[i], preset), HEAVY, scope_keys=keys[i],
                                    categories=None, k=depth_t)

        def file_vsearch(i: int) -> list[tuple[int, float]]:
            return file_vectors.search(qvecs[i], HEAVY, scope_keys=keys[i], categories=None,
                                       k=depth_v)

        for i in range(n):  # warm-up: page cache, statements, and every query's embedding
            vsearch(i, depth_v)
            tsearch(i)
            await hybrid(i)
            await recall(i)
        before = load()
        timings = [
            time_sync(f"vectors.search k={depth_v}", lambda i: vsearch(i, depth_v), n),
            time_sync("vectors.search k=10", lambda i: vsearch(i, 10), n),
            time_sync(f"text.search k={depth_t}", tsearch, n),
            await time_async("hybrid_search (query vector given)", hybrid, n),
            await time_async("recall (query embedding cached)", recall, n),
            time_sync(f"reference: text.search k={depth_t}, FTS5 scoring", fts5_search, n),
            time_sync(f"reference: vectors.search k={depth_v}, file tiers", file_vsearch, n),
        ]
        text10 = [[r for r, _ in tsearch(i)[:10]] for i in range(n)]
        fts10 = [[r for r, _ in fts5_search(i)[:10]] for i in range(n)]
        same_scores = statistics.fmean(
            float(a == b) for a, b in zip((tsearch(i) for i in range(n)),
                                          (fts5_search(i) for i in range(n)), strict=True)
        )
        found10 = [[r for r, _ in vsearch(i, 10)] for i in range(n)]
        found_d = [[r for r, _ in vsearch(i, depth_v)] for i in range(n)]
        exact10 = [exact_top(qvecs[i], rowids, matrix, allowed[i], 10) for i in range(n)]
        exact_d = [exact_top(qvecs[i], rowids, matrix, allowed[i], depth_v) for i in range(n)]
        t_exact = time_sync(
            "exact numpy cosine (reference)",
            lambda i: exact_top(qvecs[i], rowids, matrix, allowed[i], depth_v), n,
        )
        text_rows = [text_matches(conn, clean_query(q, preset), preset.stop_words)
                     for q in queries]
        tiers = {
            name: int(conn.execute(f"SELECT count(*) FROM {table} WHERE user_id = ?",
                                   (HEAVY,)).fetchone()[0])
            for name, table in (("compact", "memory_vectors_compact"),
                                ("vec0", "memory_vectors"), ("heavy", "memory_vectors_heavy"))
        }
        return {
            "size": size, "memories": len(rows), "queries": n, "load": f"{before} → {load()}",
            "timings": [*timings, t_exact], "agree10": agreement(found10, exact10),
            "agree_depth": agreement(found_d, exact_d), "depth": depth_v, "tiers": tiers,
            "db_mb": path.stat().st_size / 1e6, "text_rows": statistics.median(text_rows),
            "bm25_agree10": agreement(text10, fts10), "bm25_identical": same_scores,
            "build_ms": (build_v, build_t),
        }
    finally:
        await mem.close()


# --- report ---------------------------------------------------------------------------------


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| memories of the user | tier | what | p50 ms | p99 ms | CPU p50 ms | CPU p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        tier = max(r["tiers"], key=lambda t: r["tiers"][t])
        for t in r["timings"]:
            lines.append(
                f"| {r['memories']:,} | {tier} | {t.name} | {t.p(50):.2f} | {t.p(99):.2f} | "
                f"{t.p(50, True):.2f} | {t.p(99, True):.2f} |"
            )
    lines += ["", "| memories | top-10 agreement | top-depth agreement | full-text rows matched"
              " p50 | file MB | load |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['memories']:,} | {r['agree10']:.4f} | {r['agree_depth']:.4f} "
                     f"(k={r['depth']}) | {r['text_rows']:,.0f} | {r['db_mb']:.0f} | {r['load']} |")
    lines += ["", "| memories | BM25 top-10 agreement with FTS5 bm25 | queries with identical "
              "(rowid, score) lists | reading the process's copy (warm): vector / text ms |",
              "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['memories']:,} | {r['bm25_agree10']:.4f} | {r['bm25_identical']:.4f} "
                     f"| {r['build_ms'][0]:,.0f} / {r['build_ms'][1]:,.0f} |")
    big = max(results, key=lambda r: r["size"])
    hybrid = next(t for t in big["timings"] if t.name.startswith("hybrid"))
    text = next(t for t in big["timings"] if t.name.startswith("text"))
    vector = big["timings"][0]
    lines += [
        "", "| target at the largest size | measured | verdict |", "|---|---|---|",
        f"| hybrid (vector + text + ranking) p50 ≤ {TARGET_HYBRID_P50_MS:g} ms | "
        f"{hybrid.p(50):.2f} ms (CPU {hybrid.p(50, True):.2f}) | "
        f"{'met' if hybrid.p(50) <= TARGET_HYBRID_P50_MS else '**not met**'} |",
        f"| full-text p50 ≤ {TARGET_TEXT_P50_MS:g} ms | {text.p(50):.2f} ms "
        f"(CPU {text.p(50, True):.2f}) | "
        f"{'met' if text.p(50) <= TARGET_TEXT_P50_MS else '**not met**'} |",
        f"| vector search p50 ≤ {TARGET_VECTOR_P50_MS:g} ms | {vector.p(50):.2f} ms "
        f"(CPU {vector.p(50, True):.2f}) | "
        f"{'met' if vector.p(50) <= TARGET_VECTOR_P50_MS else '**not met**'} |",
        f"| BM25 top-10 agreement with FTS5 ≥ {TARGET_BM25_AGREEMENT} | "
        f"{big['bm25_agree10']:.4f} | "
        f"{'met' if big['bm25_agree10'] >= TARGET_BM25_AGREEMENT else '**not met**'} |",
        f"| top-10 agreement ≥ {TARGET_AGREEMENT} | {big['agree10']:.4f} | "
        f"{'met' if big['agree10'] >= TARGET_AGREEMENT else '**not met**'} |",
    ]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> None:
    sizes = [1000, 10_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    biggest = max(sizes)
    real = min(args.real or biggest, biggest)
    started = time.perf_counter()
    m = machine()
    print(f"{m['date']}: {m['nproc']} cores ({m['cpu']}), sqlite {m['sqlite']}, sqlite-vec "
          f"{m['sqlite_vec']}, commit {m['commit']}, load {load()}", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    embedder = real_embedder("default", 1, cached=False)
    sentences = make_memory_pool(real + SMALL_USERS * SMALL_EACH, seed=21)
    vectors = real_vectors(embedder, [t for _, t in sentences])
    small = [(c, t, vectors[real + i]) for i, (c, t) in enumerate(sentences[real:])]
    queries = make_queries(args.queries, seed=5)
    qvecs = embed_cached(embedder, queries, "heavy-queries", 128)
    model_id = embedder.model_id
    query_embedder = real_embedder("default", 1, cached=True)
    results = []
    for size in sizes:
        memories = memories_for(size, sentences[:real], vectors, seed=size)
        path = CACHE / f"heavy-v2-{size}-{real}.db"  # v2: the draft generator's version
        if args.rebuild or not path.exists():
            lookup = {t: v for _, t, v in memories} | {t: v for _, t, v in small}
            seconds = await build(path, drafts_for(memories, small, seed=size),
                                  PoolEmbedder(model_id, lookup))
            print(f"  built {size:,} in {seconds:.0f} s (load {load()})", flush=True)
        result = await measure(path, size, queries, qvecs, query_embedder)
        results.append(result)
        print(f"  {size:,}: vector p50 {result['timings'][0].p(50):.2f} ms, agreement@10 "
              f"{result['agree10']:.4f}, hybrid p50 {result['timings'][3].p(50):.2f} ms "
              f"(load {load()})", flush=True)
    print()
    print(f"Command: `python bench/heavy_user_search.py {' '.join(sys.argv[1:])}`; "
          f"{real:,} real sentence vectors; {time.perf_counter() - started:.0f} s in all.")
    print()
    print(table(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="1k and 10k only")
    parser.add_argument("--real", type=int, default=0,
                        help="sentences to embed (default: the largest size, all real)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached stores")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
