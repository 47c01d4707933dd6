"""Fit the learned ranker's weights (`memory/ranker.py`) on LoCoMo's dev conversations.

    python bench/locomo_fit_ranker.py [--db PATH] [--facts-db PATH] [--preset NAME]
                                      [--data PATH] [--negatives 60] [--c 1.0]

For every dev question (conv-26 … conv-44 only; the test conversations are never read), the
engine's own candidates and feature values come from `HierarchicalMemory.explain_ranking`, so
what is fitted is exactly what recall computes. A candidate is positive when it is one of the
question's evidence turns. The fit is a pairwise logistic regression (RankNet with a linear
scorer): for each question, each positive against up to `--negatives` sampled negatives, each
question weighing the same, L2-regularised, solved by Newton's method (12 weights, a few
seconds), with every weight but the answered-question penalty kept ≥ 0 (`fit_monotone`).
It prints the weights; paste them into `ranker.WEIGHT_SETS`, then run `bench/proxy_recall.py`
to see dev and test.

With `--facts-db` (a facts database `bench/proxy_recall.py --db-dir` kept), the dev questions
of the facts shape join: each asked as its speaker's user, a candidate positive when its source
facts cover an evidence turn; every question weighs the same, whichever shape. `--preset` names
the preset whose features are collected (its sitting gate and length cap; default `default`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from locomo_recall import DEV, TOP_K, default_data_path, ingest, load  # noqa: E402
from proxy_recall import evidence_map, load_facts  # noqa: E402

from headroom.memory import HierarchicalMemory, MemoryConfig  # noqa: E402
from headroom.memory.ranker import FEATURES  # noqa: E402


def fit_pairwise(diffs: np.ndarray, weights: np.ndarray, c: float, steps: int = 50) -> np.ndarray:
    """argmin_w Σ weight·log(1 + exp(−w·d)) + ‖w‖² / (2c), by Newton's method."""
    w = np.zeros(diffs.shape[1])
    for _ in range(steps):
        margin = diffs @ w
        p = 1.0 / (1.0 + np.exp(margin))  # σ(−margin): the pair's loss gradient share
        grad = -(diffs * (weights * p)[:, None]).sum(axis=0) + w / c
        hess = (diffs * (weights * p * (1 - p))[:, None]).T @ diffs + np.eye(len(w)) / c
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


# Evidence of relevance must never lower a score: more cosine, more BM25, a better rank, a
# matching neighbour or date or name only helps. Unconstrained, correlated features (raw and
# scaled cosine) get weights of opposite signs that fit LoCoMo's score ranges and rank a
# better-matching memory lower elsewhere. Only a question whose answer matched may lose.
MAY_BE_NEGATIVE = frozenset({"question_answered"})


def fit_monotone(diffs: np.ndarray, weights: np.ndarray, c: float) -> np.ndarray:
    """`fit_pairwise` with the weights outside `MAY_BE_NEGATIVE` kept ≥ 0: the most negative
    one is fixed at 0 and the rest refitted, until none is negative (an active-set method)."""
    active = list(range(diffs.shape[1]))
    while True:
        w = np.zeros(diffs.shape[1])
        w[active] = fit_pairwise(diffs[:, active], weights, c)
        bad = [i for i in active if w[i] < 0 and FEATURES[i] not in MAY_BE_NEGATIVE]
        if not bad:
            return w
        active.remove(min(bad, key=lambda i: w[i]))


Sources = Callable[[Any], set[str]]


async def collect(  # type: ignore[no-untyped-def]
    mem: HierarchicalMemory, asks: list[tuple[str, str, datetime, list[str]]],
    sources: Sources, negatives: int, seed: int, preset: str,
):
    """Pairwise feature differences for (question, user, now, evidence) asks."""
    rng = np.random.default_rng(seed)
    diffs: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    questions = 0
    for text, user, now, evidence_ids in asks:
        cands = await mem.explain_ranking(text, user, top_k=TOP_K, now=now, preset=preset)
        if not cands:
            continue
        x = np.array([[c["features"][f] for f in FEATURES] for c in cands])
        evidence = set(evidence_ids)
        y = np.array([bool(evidence & sources(c["memory"])) for c in cands])
        pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
        if not len(pos) or not len(neg):
            continue
        if len(neg) > negatives:
            neg = rng.choice(neg, negatives, replace=False)
        d = (x[pos][:, None, :] - x[neg][None, :, :]).reshape(-1, x.shape[1])
        diffs.append(d)
        weights.append(np.full(len(d), 1.0 / len(d)))
        questions += 1
    return np.concatenate(diffs), np.concatenate(weights), questions


async def turn_pairs(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    convs = load(Path(args.data), "turns", DEV)
    asks = [(q.text, c.id, c.last + timedelta(days=1), q.evidence)
            for c in convs for q in c.questions]
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or str(Path(tmp) / "locomo.db")
        fresh = not Path(db).exists()
        mem = await HierarchicalMemory.create(MemoryConfig(db_path=db))
        try:
            if fresh:
                print("ingesting the dev conversations…", flush=True)
                await ingest(mem, convs)
            return await collect(
                mem, asks, lambda m: set(m.metadata.get("dia_ids", [])), args.negatives,
                args.seed, args.preset,
            )
        finally:
            await mem.close()


async def fact_pairs(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    blocks, asks = load_facts(Path(args.data), DEV)
    mem = await HierarchicalMemory.create(MemoryConfig(db_path=args.facts_db))
    try:
        sources_of, _ = await evidence_map(mem, blocks)
        return await collect(
            mem, [(a.text, a.user, a.now, a.evidence) for a in asks],
            lambda m: sources_of.get(m.id, set()), args.negatives, args.seed, args.preset,
        )
    finally:
        await mem.close()


async def run(args: argparse.Namespace) -> None:
    parts = [await turn_pairs(args)]
    if args.facts_db:
        parts.append(await fact_pairs(args))
    diffs = np.concatenate([p[0] for p in parts])
    weights = np.concatenate([p[1] for p in parts])
    n = sum(p[2] for p in parts)
    # Each question weighs 1 in all; scale so that c means what it does for per-pair losses.
    weights *= len(diffs) / weights.sum()
    w = fit_monotone(diffs, weights, args.c)
    agree = float((weights * (diffs @ w > 0)).sum() / weights.sum())
    print(f"{n} dev questions, {len(diffs)} pairs; pairs ordered right: {100 * agree:.1f} %")
    for name, value in zip(FEATURES, w, strict=True):
        print(f"    {name:<18} {value:6.2f}")
    print("[" + ", ".join(f"{v:.2f}" for v in w) + "]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", help="a turn-mode database from locomo_recall.py --db")
    parser.add_argument("--facts-db", help="a facts database from proxy_recall.py --db-dir")
    parser.add_argument("--preset", default="default", help="collect this preset's features")
    parser.add_argument("--data", default=str(default_data_path()))
    parser.add_argument("--negatives", type=int, default=60)
    parser.add_argument("--c", type=float, default=1.0, help="inverse L2 strength")
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
