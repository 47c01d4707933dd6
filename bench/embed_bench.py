"""Query embedding cost and agreement for each local runtime: torch float, ONNX float, ONNX int8.

    python bench/embed_bench.py [--runs 200] [--threads 1,2] [--sentences 1200] [--quick]

Latency: one short query and a batch of 8 (what `BatchingEmbedder` sends under concurrency),
p50/p99, the runtimes interleaved round by round in one process per thread count (torch's thread
count and OpenMP settings are process-wide), so all see the same machine load.

Agreement, over `--sentences` varied texts (LoCoMo turns and questions when the data is there,
else generated ones): the cosine of each runtime's vector with torch float's, min / p1 / mean;
and for int8 queries searching float-made memories (the `onnx-int8` runtime), the overlap of
each question's top 10 turns with the float query's top 10.

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


def agreement_texts(count: int) -> tuple[list[str], list[str]]:
    """(documents, questions): LoCoMo's turns and questions, else generated sentences."""
    rng = random.Random(7)
    path = Path(os.environ.get("HEADROOM_LOCOMO", LOCOMO))
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        turns = [
            turn["text"]
            for conv in data
            for key, session in conv["conversation"].items()
            if key.startswith("session_") and isinstance(session, list)
            for turn in session
            if turn.get("text")
        ]
        questions = [qa["question"] for conv in data for qa in conv["qa"]]
        docs = rng.sample(turns, min(len(turns), count * 2 // 3))
        return docs, rng.sample(questions, min(len(questions), count - len(docs)))
    subjects = ["my sister", "the billing service", "our dog", "the Paris trip", "my manager"]
    verbs = ["prefers", "moved to", "is afraid of", "decided on", "keeps forgetting"]
    objects = ["PostgreSQL", "Lisbon", "thunderstorms", "a red bike", "the Friday deadline"]
    docs = [
        f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)} ({i})."
        for i in range(count * 2 // 3)
    ]
    questions = [f"what about {rng.choice(subjects)} and {rng.choice(objects)}?" for _ in docs]
    return docs, questions[: count - len(docs)]


def build(runtime: str, threads: int, cache_dir: Path | None) -> Any:
    from headroom.memory.embedders import LocalEmbedder, OnnxEmbedder

    if runtime == "torch":
        return LocalEmbedder(torch_threads=threads)
    return OnnxEmbedder(threads=threads, cache_dir=cache_dir, quantized=runtime == "onnx_int8")


def run_child(threads: int, runs: int, sentences: int, cache_dir: Path | None) -> dict[str, Any]:
    embedders = {}
    for runtime in RUNTIMES:
        started = time.perf_counter()
        embedders[runtime] = build(runtime, threads, cache_dir)
        embedders[runtime].load()
        embedders[runtime].embed([QUERY])
        embedders[runtime].load_s = time.perf_counter() - started
    docs, questions = agreement_texts(sentences)
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
    for runtime in RUNTIMES:
        out["rows"].append({
            "runtime": runtime, "threads": threads,
            "load_s": round(embedders[runtime].load_s, 2),
            "single_p50": float(np.percentile(single[runtime], 50)),
            "single_p99": float(np.percentile(single[runtime], 99)),
            "batch8_p50": float(np.percentile(batched[runtime], 50)),
        })
    if threads == 1 and docs:
        texts = docs + questions
        vectors = {r: embedders[r].embed(texts) for r in RUNTIMES}
        out["agreement"] = {}
        for runtime in RUNTIMES[1:]:
            cos = np.sum(vectors[runtime] * vectors["torch"], axis=1)
            out["agreement"][runtime] = {
                "n": len(texts), "min": float(cos.min()), "p1": float(np.percentile(cos, 1)),
                "mean": float(cos.mean()),
            }
        # int8 questions searching float-made documents, against float questions.
        doc_vectors = vectors["onnx"][: len(docs)]
        float_q, int8_q = vectors["onnx"][len(docs):], vectors["onnx_int8"][len(docs):]
        top = min(10, len(docs))
        overlaps = []
        for fq, iq in zip(float_q, int8_q, strict=True):
            want = set(np.argsort(-(doc_vectors @ fq))[:top])
            got = set(np.argsort(-(doc_vectors @ iq))[:top])
            overlaps.append(len(want & got) / top)
        out["retrieval_top10_overlap"] = float(np.mean(overlaps)) if overlaps else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--sentences", type=int, default=1200)
    parser.add_argument("--quick", action="store_true", help="30 runs, 1 thread, 300 sentences")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="ONNX exports (default: the user's cache, as in the product)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.runs, args.threads, args.sentences = 30, "1", 300
    if args.child:
        print(json.dumps(run_child(args.child, args.runs, args.sentences, args.cache_dir)))
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
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'runtime':<10} {'threads':>7} {'load s':>7} {'1 query p50':>12} {'p99':>7} "
          f"{'batch 8 p50':>12}")
    for result in results:
        for r in result["rows"]:
            print(f"{r['runtime']:<10} {r['threads']:>7} {r['load_s']:>7} "
                  f"{r['single_p50']:>9.2f} ms {r['single_p99']:>7.2f} {r['batch8_p50']:>9.2f} ms")
    for result in results:
        for runtime, a in result.get("agreement", {}).items():
            print(f"cosine {runtime} vs torch over {a['n']} texts: min {a['min']:.4f} "
                  f"p1 {a['p1']:.4f} mean {a['mean']:.4f}")
        if result.get("retrieval_top10_overlap") is not None:
            print("int8 questions vs float questions over float documents: top-10 overlap "
                  f"{result['retrieval_top10_overlap']:.3f}")
    print(f"load average after: {os.getloadavg()}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
