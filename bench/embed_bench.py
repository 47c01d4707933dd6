"""Query embedding cost and agreement for each local runtime: torch float, ONNX float, ONNX int8.

    python bench/embed_bench.py [--runs 200] [--threads 1,2] [--sentences 1200] [--quick]
                                [--pipeline] [--idle 5,20]

Latency: one short query and a batch of 8 (what `BatchingEmbedder` sends under concurrency),
p50/p99, the runtimes interleaved round by round in one process per thread count (torch's thread
count and OpenMP settings are process-wide), so all see the same machine load.

Agreement, over `--sentences` varied texts (LoCoMo turns, questions and long multi-turn
messages when the data is there, else generated ones), each embedded alone as a lone query is:
the cosine of each runtime's vector with torch float's, min / p1 / mean, overall and per kind;
and for int8 queries searching float-made memories (the `onnx-int8` runtime), the overlap of
each question's top 10 turns with the float query's top 10.

`--idle 5,20` adds one short query after the model sat idle that many milliseconds, each runtime
alone (interleaved, one runtime's weights would push another's out of the caches): a server's
case, where the query model waits between requests and its weights have left the caches.

`--pipeline` adds what the engine pays around the model for one query (the product's query
path, `HierarchicalMemory.embed_query`, cache off) against the bare tokenizer + session run, at
concurrency 1 and for `asyncio.gather` of 8 queries (model calls per round, CPU per query).

The int8 model is the product's (`OnnxEmbedder(quantized=True)`), made on first use in the user's
cache (a temp copy with `--cache-dir`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUERY = "what language should I use for my microservice?"
RUNTIMES = ("torch", "onnx", "onnx_int8")
LOCOMO = ROOT.parent / "shared" / "bench" / "locomo10.json"


def agreement_texts(count: int) -> tuple[list[str], list[str], list[str]]:
    """(documents, questions, long messages): LoCoMo's turns, questions and runs of 3-10 turns
    of one session joined (a long chat message), else generated sentences."""
    rng = random.Random(7)
    path = Path(os.environ.get("HEADROOM_LOCOMO", LOCOMO))
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        sessions = [
            [turn["text"] for turn in session if turn.get("text")]
            for conv in data
            for key, session in conv["conversation"].items()
            if key.startswith("session_") and isinstance(session, list)
        ]
        turns = [text for session in sessions for text in session]
        questions = [qa["question"] for conv in data for qa in conv["qa"]]
        docs = rng.sample(turns, min(len(turns), count // 2))
        longs = []
        for _ in range(count // 6):
            session = rng.choice([s for s in sessions if len(s) >= 3])
            size = rng.randint(3, min(10, len(session)))
            start = rng.randint(0, len(session) - size)
            longs.append(" ".join(session[start : start + size]))
        wanted = count - len(docs) - len(longs)
        return docs, rng.sample(questions, min(len(questions), wanted)), longs
    subjects = ["my sister", "the billing service", "our dog", "the Paris trip", "my manager"]
    verbs = ["prefers", "moved to", "is afraid of", "decided on", "keeps forgetting"]
    objects = ["PostgreSQL", "Lisbon", "thunderstorms", "a red bike", "the Friday deadline"]
    docs = [
        f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)} ({i})."
        for i in range(count * 2 // 3)
    ]
    questions = [f"what about {rng.choice(subjects)} and {rng.choice(objects)}?" for _ in docs]
    longs = [" ".join(docs[i : i + 6]) for i in range(0, len(docs), 40)]
    return docs, questions[: count - len(docs) - len(longs)], longs


def build(runtime: str, threads: int, cache_dir: Path | None) -> Any:
    from headroom.memory.embedders import LocalEmbedder, OnnxEmbedder

    if runtime == "torch":
        return LocalEmbedder(torch_threads=threads)
    return OnnxEmbedder(threads=threads, cache_dir=cache_dir, quantized=runtime == "onnx_int8")


def idle_latency(embedder: Any, questions: list[str], gaps_ms: list[float], runs: int
                 ) -> dict[str, float]:
    """p50 of one fresh query after `gap` ms of idling, for each gap (0: back to back)."""
    for _ in range(10):
        embedder.embed([QUERY])
    out = {}
    for gap in [0.0, *gaps_ms]:
        times = []
        for i in range(runs):
            if gap:
                time.sleep(gap / 1000)
            text = f"{questions[i % len(questions)] if questions else QUERY} ({i})"
            t0 = time.perf_counter()
            embedder.embed([text])
            times.append((time.perf_counter() - t0) * 1000)
        out[f"{gap:g}"] = float(np.percentile(times, 50))
    return out


def run_child(threads: int, runs: int, sentences: int, cache_dir: Path | None,
              idle_gaps: list[float] | None = None) -> dict[str, Any]:
    embedders = {}
    for runtime in RUNTIMES:
        started = time.perf_counter()
        embedders[runtime] = build(runtime, threads, cache_dir)
        embedders[runtime].load()
        embedders[runtime].embed([QUERY])
        embedders[runtime].load_s = time.perf_counter() - started
    docs, questions, longs = agreement_texts(sentences)
    batch = questions[:8] if len(questions) >= 8 else [QUERY] * 8
    single: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    batched: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    for i in range(runs + 10):  # the first 10 rounds warm up
        order = RUNTIMES if i % 2 else RUNTIMES[::-1]
        for runtime in order:
            query = questions[i % len(questions)] if questions else QUERY
            t0 = time.perf_counter()
            embedders[runtime].embed([query])
            t1 = time.perf_counter()
            embedders[runtime].embed(batch)
            t2 = time.perf_counter()
            if i >= 10:
                single[runtime].append((t1 - t0) * 1000)
                batched[runtime].append((t2 - t1) * 1000)
    out: dict[str, Any] = {"threads": threads, "rows": []}
    if idle_gaps:
        out["idle"] = {r: idle_latency(embedders[r], questions, idle_gaps, runs)
                       for r in RUNTIMES}
    for runtime in RUNTIMES:
        out["rows"].append({
            "runtime": runtime, "threads": threads,
            "load_s": round(embedders[runtime].load_s, 2),
            "single_p50": float(np.percentile(single[runtime], 50)),
            "single_p99": float(np.percentile(single[runtime], 99)),
            "batch8_p50": float(np.percentile(batched[runtime], 50)),
        })
    if threads == 1 and docs:
        texts = docs + questions + longs
        kinds = {"turns": range(len(docs)),
                 "questions": range(len(docs), len(docs) + len(questions)),
                 "long": range(len(docs) + len(questions), len(texts))}
        # One text per call, as a lone query runs (int8 vectors move a little with batch-mates).
        vectors = {r: np.vstack([embedders[r].embed([t]) for t in texts]) for r in RUNTIMES}
        out["agreement"] = {}
        for runtime in RUNTIMES[1:]:
            cos = np.sum(vectors[runtime] * vectors["torch"], axis=1)
            out["agreement"][runtime] = {
                "n": len(texts), "min": float(cos.min()), "p1": float(np.percentile(cos, 1)),
                "mean": float(cos.mean()),
                "by_kind": {k: [len(rows), float(cos[rows].min()), float(cos[rows].mean())]
                            for k, rows in kinds.items() if len(rows)},
            }
        # int8 questions searching float-made documents, against float questions.
        doc_vectors = vectors["onnx"][: len(docs)]
        asked = slice(len(docs), len(docs) + len(questions))
        float_q, int8_q = vectors["onnx"][asked], vectors["onnx_int8"][asked]
        top = min(10, len(docs))
        overlaps = []
        for fq, iq in zip(float_q, int8_q, strict=True):
            want = set(np.argsort(-(doc_vectors @ fq))[:top])
            got = set(np.argsort(-(doc_vectors @ iq))[:top])
            overlaps.append(len(want & got) / top)
        out["retrieval_top10_overlap"] = float(np.mean(overlaps)) if overlaps else None
    return out


def run_pipeline(threads: int, runs: int, cache_dir: Path | None) -> dict[str, Any]:
    """The product's query path against the bare model run of the same (query) model."""
    import asyncio
    import tempfile

    from headroom.memory import HierarchicalMemory, MemoryConfig
    from headroom.memory.embedders import OnnxEmbedder

    embedder = OnnxEmbedder(threads=threads, cache_dir=cache_dir, int8_queries=True)
    embedder.load()
    model = embedder.query_embedder
    assert model is not None
    _, questions, _ = agreement_texts(max(600, runs * 3 + 64))
    fresh = iter(questions * 4)

    def bare(text: str) -> None:
        encodings = model._tokenizer.encode_batch([text])
        feeds = {name: np.array([getattr(e, field) for e in encodings], dtype=np.int64)
                 for name, field in model._input_fields}
        model._session.run(None, feeds)

    async def measure() -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            memory = await HierarchicalMemory.create(
                MemoryConfig(db_path=Path(tmp) / "m.db", query_embedding_cache_size=0),
                embedder=embedder,
            )
            try:
                for _ in range(10):
                    bare(next(fresh))
                    await memory.embed_query(next(fresh))
                wall: dict[str, list[float]] = {"bare": [], "embed_query": []}
                cpu = {"bare": 0.0, "embed_query": 0.0}
                for i in range(runs * 2):  # interleaved
                    name = "bare" if i % 2 else "embed_query"
                    text = next(fresh)
                    c0, t0 = time.process_time(), time.perf_counter()
                    if name == "bare":
                        bare(text)
                    else:
                        await memory.embed_query(text)
                    wall[name].append((time.perf_counter() - t0) * 1000)
                    cpu[name] += time.process_time() - c0
                batcher = memory._executors.query_batcher
                rows: dict[str, Any] = {
                    name: {"wall_p50": float(np.percentile(wall[name], 50)),
                           "cpu_ms": cpu[name] * 1000 / runs} for name in wall
                }
                rounds = max(5, runs // 8)
                for mode in ("gather8", "sequential8"):
                    calls = batcher.stats()["model_calls"]
                    c0, t0 = time.process_time(), time.perf_counter()
                    for _ in range(rounds):
                        batch = [next(fresh) for _ in range(8)]
                        if mode == "gather8":
                            await asyncio.gather(*(memory.embed_query(q) for q in batch))
                        else:
                            for q in batch:
                                await memory.embed_query(q)
                    rows[mode] = {
                        "wall_per_round": (time.perf_counter() - t0) * 1000 / rounds,
                        "cpu_per_query": (time.process_time() - c0) * 1000 / (rounds * 8),
                        "model_calls_per_round": (batcher.stats()["model_calls"] - calls) / rounds,
                    }
                return rows
            finally:
                await memory.close()

    return {"threads": threads, "pipeline": asyncio.run(measure())}


def print_pipeline(result: dict[str, Any]) -> None:
    rows = result["pipeline"]
    print(f"query path, threads {result['threads']} (int8 query model, cache off):")
    for name in ("bare", "embed_query"):
        print(f"  c=1 {name:<12} wall p50 {rows[name]['wall_p50']:6.2f} ms   "
              f"process CPU {rows[name]['cpu_ms']:6.2f} ms/query")
    for name in ("gather8", "sequential8"):
        r = rows[name]
        print(f"  {name:<16} {r['model_calls_per_round']:.1f} model calls per 8 queries, "
              f"wall {r['wall_per_round']:6.1f} ms per round, "
              f"CPU {r['cpu_per_query']:.2f} ms/query")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--sentences", type=int, default=1200)
    parser.add_argument("--quick", action="store_true", help="30 runs, 1 thread, 300 sentences")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="ONNX exports (default: the user's cache, as in the product)")
    parser.add_argument("--pipeline", action="store_true",
                        help="also the engine's query path vs the bare model run, c=1 and c=8")
    parser.add_argument("--idle", default="",
                        help="also one query after this many ms idle, e.g. 5,20 (per runtime)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.runs, args.threads, args.sentences = 30, "1", 300
    if args.child:
        gaps = [float(g) for g in args.idle.split(",") if g]
        print(json.dumps(run_child(args.child, args.runs, args.sentences, args.cache_dir, gaps)))
        return
    if args.pipeline_child:
        print(json.dumps(run_pipeline(args.pipeline_child, args.runs, args.cache_dir)))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    started = time.perf_counter()
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} cpus; {args.runs} runs")
    results = []
    for threads in (int(t) for t in args.threads.split(",")):
        command = [sys.executable, __file__, "--child", str(threads), "--runs", str(args.runs),
                   "--sentences", str(args.sentences)]
        if args.cache_dir:
            command += ["--cache-dir", str(args.cache_dir)]
        if args.idle:
            command += ["--idle", args.idle]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    pipelines = []
    for threads in (int(t) for t in args.threads.split(",")) if args.pipeline else ():
        command = [sys.executable, __file__, "--pipeline-child", str(threads),
                   "--runs", str(args.runs)]
        if args.cache_dir:
            command += ["--cache-dir", str(args.cache_dir)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        pipelines.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'runtime':<10} {'threads':>7} {'load s':>7} {'1 query p50':>12} {'p99':>7} "
          f"{'batch 8 p50':>12}")
    for result in results:
        for r in result["rows"]:
            print(f"{r['runtime']:<10} {r['threads']:>7} {r['load_s']:>7} "
                  f"{r['single_p50']:>9.2f} ms {r['single_p99']:>7.2f} {r['batch8_p50']:>9.2f} ms")
    for result in results:
        for runtime, gaps in result.get("idle", {}).items():
            print(f"{runtime:<10} threads {result['threads']}, one query after idling: "
                  + ", ".join(f"{gap} ms idle {p50:.2f} ms" for gap, p50 in gaps.items()))
    for result in results:
        for runtime, a in result.get("agreement", {}).items():
            print(f"cosine {runtime} vs torch over {a['n']} texts: min {a['min']:.4f} "
                  f"p1 {a['p1']:.4f} mean {a['mean']:.4f}")
            for kind, (n, low, mean) in a["by_kind"].items():
                print(f"    {kind:<10} {n:>5} texts: min {low:.4f} mean {mean:.4f}")
        if result.get("retrieval_top10_overlap") is not None:
            print("int8 questions vs float questions over float documents: top-10 overlap "
                  f"{result['retrieval_top10_overlap']:.3f}")
    for pipeline in pipelines:
        print_pipeline(pipeline)
    print(f"load average after: {os.getloadavg()}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
