"""Recall quality on LoCoMo (ACL 2024): does the right past turn come back for a question?

Through the public API only: one user per conversation, every turn (or, with
`--mode observations`, every LLM-extracted fact) one user-scope memory dated at its session,
and every question asked through `HierarchicalMemory.recall`, the function the proxy uses.

    python bench/locomo_recall.py [--mode turns|observations] [--preset NAME | --presets a,b]
                                  [--split dev|test|all] [--data PATH] [--json out.json]

Data: `--data`, else $HEADROOM_LOCOMO, else ../shared/bench/locomo10.json beside the repository.
R@k is the LoCoMo paper's "recall accuracy": the fraction of a question's evidence turns found in
the top k, averaged over questions. Parameters are chosen on the dev split (conv-26 … conv-44);
the test split (conv-47 … conv-50) shows whether they overfit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from headroom.memory import HierarchicalMemory, MemoryConfig  # noqa: E402
from headroom.memory.hierarchical import MemoryDraft  # noqa: E402
from headroom.memory.recall import PRESETS  # noqa: E402

DEV = ("conv-26", "conv-30", "conv-41", "conv-42", "conv-43", "conv-44")
TEST = ("conv-47", "conv-48", "conv-49", "conv-50")
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
KS = (5, 10, 25)
TOP_K = 25
BATCH = 256

_SESSION = re.compile(r"session_(\d+)")
_DIA = re.compile(r"D:?(\d+):0*(\d+)")


# --- data ---------------------------------------------------------------------------------------


def default_data_path() -> Path:
    env = os.environ.get("HEADROOM_LOCOMO")
    if env:
        return Path(env)
    return ROOT.parent / "shared" / "bench" / "locomo10.json"


def parse_session_date(text: str) -> datetime:
    """`"1:56 pm on 8 May, 2023"` → an aware UTC datetime."""
    return datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)


def normalise_ids(raw: str | Sequence[str], valid: set[str] | None = None) -> list[str]:
    """Evidence ids as the dataset writes them (`"D8:6; D9:17"`, `"D:11:26"`, `"D30:05"`, `"D"`,
    lists) → clean `D<session>:<turn>` ids, in order, without duplicates or unknown ids."""
    parts = [raw] if isinstance(raw, str) else list(raw)
    out: list[str] = []
    for part in parts:
        for piece in re.split(r"[;,\s]+", str(part)):
            m = _DIA.fullmatch(piece.strip())
            if not m:
                continue
            dia = f"D{int(m.group(1))}:{int(m.group(2))}"
            if (valid is None or dia in valid) and dia not in out:
                out.append(dia)
    return out


def turn_text(turn: dict) -> str:
    text = f"{turn['speaker']}: {turn['text']}"
    caption = turn.get("blip_caption")
    return f"{text} [photo: {caption}]" if caption else text


@dataclass
class Item:
    """One memory to ingest: its text, date, and the turns it stands for."""

    text: str
    when: datetime
    session: int
    dia_ids: list[str]


@dataclass
class Question:
    conv: str
    text: str
    category: int
    evidence: list[str]


@dataclass
class Conversation:
    id: str
    items: list[Item]
    questions: list[Question]
    last: datetime
    turns: set[str] = field(default_factory=set)


def load(path: Path, mode: str, convs: Iterable[str]) -> list[Conversation]:
    wanted = set(convs)
    out = []
    for raw in json.loads(path.read_text(encoding="utf-8")):
        if raw["sample_id"] not in wanted:
            continue
        conv = raw["conversation"]
        sessions: dict[int, tuple[datetime, list[dict]]] = {}
        for key, turns in conv.items():
            m = _SESSION.fullmatch(key)
            if m and turns:
                n = int(m.group(1))
                sessions[n] = (parse_session_date(conv[f"{key}_date_time"]), turns)
        valid = {t["dia_id"] for _, turns in sessions.values() for t in turns}
        items: list[Item] = []
        if mode == "turns":
            for n in sorted(sessions):
                when, turns = sessions[n]
                items += [Item(turn_text(t), when, n, [t["dia_id"]]) for t in turns]
        else:
            for key, by_speaker in raw["observation"].items():
                n = int(re.search(r"\d+", key).group())  # type: ignore[union-attr]
                if n not in sessions:
                    continue
                for facts in by_speaker.values():
                    for text, source in facts:
                        ids = normalise_ids(source, valid)
                        if ids:
                            items.append(Item(text, sessions[n][0], n, ids))
            items.sort(key=lambda it: it.session)
        questions = [
            Question(raw["sample_id"], q["question"], int(q["category"]), ev)
            for q in raw["qa"]
            if (ev := normalise_ids(q["evidence"], valid))
        ]
        last = max(when for when, _ in sessions.values())
        out.append(Conversation(raw["sample_id"], items, questions, last, valid))
    return out


# --- metrics ------------------------------------------------------------------------------------


def recall_at(ranked: Sequence[Sequence[str]], evidence: Sequence[str], k: int) -> float:
    """Fraction of the evidence turns covered by the top k results (each result covers the turns
    it stands for: one for a turn, one or more for an observation)."""
    covered = {d for ids in ranked[:k] for d in ids}
    return sum(e in covered for e in evidence) / len(evidence)


def ndcg_at(ranked: Sequence[Sequence[str]], evidence: Sequence[str], k: int) -> float:
    """Binary nDCG: a result gains when it covers an evidence turn not covered above it."""
    seen: set[str] = set()
    dcg = 0.0
    for i, ids in enumerate(ranked[:k]):
        new = [d for d in ids if d in evidence and d not in seen]
        if new:
            dcg += 1.0 / math.log2(i + 2)
            seen.update(new)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(evidence), k)))
    return dcg / ideal


def score_question(ranked: Sequence[Sequence[str]], evidence: Sequence[str]) -> dict[str, float]:
    row = {f"R@{k}": recall_at(ranked, evidence, k) for k in KS}
    row["nDCG@10"] = ndcg_at(ranked, evidence, 10)
    row["hit@10"] = float(recall_at(ranked, evidence, 10) > 0)
    return row


METRICS = ("R@5", "R@10", "R@25", "nDCG@10", "hit@10")


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict]] = {
        "overall": rows,
        "dev": [r for r in rows if r["conv"] in DEV],
        "test": [r for r in rows if r["conv"] in TEST],
        "w/o cat5": [r for r in rows if r["category"] != 5],
        "w/o cat5 test": [r for r in rows if r["category"] != 5 and r["conv"] in TEST],
    }
    for cat, name in CATEGORIES.items():
        groups[f"{cat} {name}"] = [r for r in rows if r["category"] == cat]
    out = {}
    for name, group in groups.items():
        if group:
            out[name] = {"n": len(group)} | {
                m: 100.0 * statistics.fmean(r[m] for r in group) for m in METRICS
            }
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# --- run ----------------------------------------------------------------------------------------


async def ingest(mem: HierarchicalMemory, convs: list[Conversation]) -> float:
    started = time.perf_counter()
    for conv in convs:
        drafts = [
            MemoryDraft(
                it.text, user_id=conv.id, created_at=it.when, valid_from=it.when, dedup=False,
                metadata={"dia_ids": it.dia_ids, "session": it.session},
            )
            for it in conv.items
        ]
        for start in range(0, len(drafts), BATCH):
            await mem.add_many(drafts[start : start + BATCH])
    return time.perf_counter() - started


async def evaluate(
    mem: HierarchicalMemory, convs: list[Conversation], *, timed: bool
) -> tuple[list[dict], dict[str, float]]:
    """Ask every question through `recall` (the proxy's path); also time the hybrid search alone
    with the query vector already computed."""
    rows: list[dict] = []
    recall_ms: list[float] = []
    hybrid_ms: list[float] = []
    for conv in convs:
        now = conv.last + timedelta(days=1)
        for q in conv.questions:
            t0 = time.perf_counter()
            memories = await mem.recall(q.text, user_id=conv.id, top_k=TOP_K, now=now)
            recall_ms.append((time.perf_counter() - t0) * 1000)
            ranked = [m.metadata.get("dia_ids", []) for m in memories]
            rows.append(
                {"conv": conv.id, "category": q.category, "question": q.text,
                 "evidence": q.evidence, "top": [",".join(ids) for ids in ranked[:10]]}
                | score_question(ranked, q.evidence)
            )
            if timed:
                vector = await mem.embed_query(q.text)  # cached by now
                t0 = time.perf_counter()
                await mem.hybrid_search(
                    q.text, conv.id, top_k=TOP_K, now=now, query_vector=vector
                )
                hybrid_ms.append((time.perf_counter() - t0) * 1000)
    latency = {
        "recall_p50_ms": percentile(recall_ms, 50), "recall_p99_ms": percentile(recall_ms, 99),
    }
    if hybrid_ms:
        latency |= {
            "hybrid_p50_ms": percentile(hybrid_ms, 50), "hybrid_p99_ms": percentile(hybrid_ms, 99),
        }
    return rows, latency


def _pair(group: dict | None) -> str:
    """R@5 / R@10 of a split group, or a dash when the run did not cover that split."""
    return f"{group['R@5']:.1f} / {group['R@10']:.1f}" if group else "–"


def markdown(out: dict) -> str:
    """One Markdown row per preset, for bench/RESULTS.md."""
    cats = [f"{c} {n}" for c, n in CATEGORIES.items()]
    head = (
        "| preset | R@5 | R@10 | R@25 | nDCG@10 | hit@10 | dev R@5 / R@10 | test R@5 / R@10 "
        "| w/o cat5 R@5 / R@10 / R@25 | R@10 cat 1 / 2 / 3 / 4 / 5 | hybrid p50 / p99 ms |"
    )
    lines = [head, "|" + " --- |" * 11]
    for name, res in out["presets"].items():
        s, lat = res["summary"], res["latency"]
        o, nc = s["overall"], s["w/o cat5"]
        per_cat = " / ".join(f"{s[c]['R@10']:.1f}" if c in s else "–" for c in cats)
        lines.append(
            f"| `{name}` | {o['R@5']:.1f} | {o['R@10']:.1f} | {o['R@25']:.1f} "
            f"| {o['nDCG@10']:.1f} | {o['hit@10']:.1f} "
            f"| {_pair(s.get('dev'))} | {_pair(s.get('test'))} "
            f"| {nc['R@5']:.1f} / {nc['R@10']:.1f} / {nc['R@25']:.1f} "
            f"| {per_cat} "
            f"| {lat.get('hybrid_p50_ms', 0):.1f} / {lat.get('hybrid_p99_ms', 0):.1f} |"
        )
    return "\n".join(lines)


def print_table(preset: str, mode: str, summary: dict, latency: dict) -> None:
    print(f"\n== mode={mode} preset={preset} ==")
    print(f"{'group':<16}{'n':>6}" + "".join(f"{m:>9}" for m in METRICS))
    for name, row in summary.items():
        print(f"{name:<16}{row['n']:>6}" + "".join(f"{row[m]:>9.1f}" for m in METRICS))
    print("latency: " + ", ".join(f"{k} {v:.2f}" for k, v in latency.items()))


async def run(args: argparse.Namespace) -> dict:
    split = {"dev": DEV, "test": TEST, "all": DEV + TEST}[args.split]
    convs = load(Path(args.data), args.mode, split)
    presets = args.presets.split(",") if args.presets else [args.preset]
    for name in presets:
        if name not in PRESETS:
            raise SystemExit(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    with tempfile.TemporaryDirectory() as tmp:
        db_path = args.db or str(Path(tmp) / "locomo.db")
        reuse = args.db is not None and Path(args.db).exists()
        config = MemoryConfig(
            db_path=db_path, recall_preset=presets[0], query_embedding_cache_size=4096,
            embedder_runtime=args.embedder_runtime,
        )
        first = await HierarchicalMemory.create(config)
        ingest_s = 0.0 if reuse else await ingest(first, convs)
        n_items = sum(len(c.items) for c in convs)
        print(
            f"{n_items} memories, {sum(len(c.questions) for c in convs)} questions;"
            f" ingest {'reused ' + db_path if reuse else f'{ingest_s:.1f} s'}",
            flush=True,
        )
        results = {}
        try:
            for i, name in enumerate(presets):
                mem = first if i == 0 else await HierarchicalMemory.create(
                    config.with_changes(recall_preset=name), embedder=first.embedder
                )
                try:
                    rows, latency = await evaluate(mem, convs, timed=True)
                finally:
                    if mem is not first:
                        await mem.close()
                if i > 0:  # query embeddings were cached by the first pass
                    latency = {k: v for k, v in latency.items() if k.startswith("hybrid")}
                summary = summarise(rows)
                print_table(name, args.mode, summary, latency)
                results[name] = {"summary": summary, "latency": latency}
                if args.details:
                    results[name]["questions"] = rows
        finally:
            await first.close()
    return {
        "mode": args.mode, "split": args.split, "memories": n_items,
        "ingest_seconds": ingest_s, "embedding_model": config.embedder_model,
        "presets": results,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("turns", "observations"), default="turns")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--presets", help="comma-separated presets, swept over one ingest")
    parser.add_argument("--split", choices=("dev", "test", "all"), default="all")
    parser.add_argument("--data", default=str(default_data_path()))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--details", action="store_true", help="per-question rows in --json")
    parser.add_argument("--db", help="keep the database here and reuse it if it exists")
    parser.add_argument(
        "--embedder-runtime", default="auto",
        help="MemoryConfig.embedder_runtime (auto, onnx, onnx-int8, torch); a reused --db keeps "
        "the stored vectors, so only the query embedding changes",
    )
    args = parser.parse_args(argv)
    out = asyncio.run(run(args))
    print("\n" + markdown(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
