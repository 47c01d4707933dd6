"""Recall shaped like proxy traffic: does what the proxy would inject hold the evidence?

    python bench/proxy_recall.py [--mode facts|turns|both] [--presets default,bm25]
                                 [--split dev|test|all] [--data PATH] [--json out.json]
                                 [--db-dir DIR]

**Facts** (what the proxy really stores): LoCoMo's `observation` facts (LLM-extracted, each with
its source turns), every conversation's facts in *one* database, each speaker their own user
(`<conv>/<speaker>`), written through the proxy's write path: a `<memory>` block's ops
(`MemoryOps`, at most `BLOCK_FACTS` facts of one speaker's session per block, in source order) go
to `HierarchicalMemory.submit`, so the outbox, dedup and bubbling handle them as they handle a
model's block. Blocks are interleaved across users (round-robin over conversations and speakers,
session by session), and the writer's clock reads the session's date while its block is applied,
so every memory carries that date as its time. A question is asked by the speaker most of its
evidence turns come from (the user the question is about), `now` = the conversation's last
session + 1 day.

**Turns** (the chat-log shape of `bench/locomo_recall.py`): every turn one memory of its
conversation's user, added with `add_many`.

Both shapes ask the way the proxy asks: the query text is built by the proxy's own
`query_text`/`cap_query` from a message list whose latest user message is the question, recall
runs with top_k 5 (and 10 for R@10), and `render_memories` with the proxy's 800-token budget
decides what would be injected. Scored on the injected memories: R@5, R@10, any-hit@5 (some
evidence in the 5), the tokens injected per request; per category, dev (conv-26 … 44) and test
(conv-47 … 50) apart.

Data: `--data`, else $HEADROOM_LOCOMO, else ../shared/bench/locomo10.json beside the repository
(CC BY-NC 4.0: read from there, never copied into the repository).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from locomo_recall import (  # noqa: E402
    CATEGORIES,
    DEV,
    TEST,
    default_data_path,
    normalise_ids,
    parse_session_date,
    percentile,
    recall_at,
)
from locomo_recall import ingest as ingest_turns  # noqa: E402
from locomo_recall import load as load_turns  # noqa: E402

import headroom.memory.models as memory_models  # noqa: E402
import headroom.memory.unit_of_work as memory_unit  # noqa: E402
import headroom.memory.writer as memory_writer  # noqa: E402
from headroom.memory import HierarchicalMemory, MemoryConfig  # noqa: E402
from headroom.memory.models import AddOp, Memory, MemoryFilter, MemoryOps, Scope  # noqa: E402
from headroom.memory.recall import (  # noqa: E402
    PRESETS,
    REQUEST_WORDS,
    STOP_WORDS,
    RecallPreset,
)
from headroom.turn.inject import cap_query, estimate_tokens, query_text, render_memories  # noqa: E402

TOP_K = 5
TOP_K_WIDE = 10
TOKEN_BUDGET = 800
BLOCK_FACTS = 4
_SESSION = re.compile(r"session_(\d+)")


# --- data: facts --------------------------------------------------------------------------------


@dataclass
class Block:
    """One `<memory>` block: facts one speaker's session gave, written at the session's date."""

    conv: str
    user: str
    session: int
    when: datetime
    facts: list[tuple[str, list[str]]]  # (text, source dia_ids)


@dataclass
class Ask:
    conv: str
    user: str
    text: str
    category: int
    evidence: list[str]
    now: datetime


def load_facts(path: Path, convs: Sequence[str]) -> tuple[list[Block], list[Ask]]:
    """Blocks interleaved across users, and each question with the user who asks it."""
    wanted = set(convs)
    per_user: dict[str, list[Block]] = {}
    asks: list[Ask] = []
    for raw in json.loads(path.read_text(encoding="utf-8")):
        conv_id = raw["sample_id"]
        if conv_id not in wanted:
            continue
        conv = raw["conversation"]
        dates: dict[int, datetime] = {}
        speaker_of: dict[str, str] = {}
        for key, turns in conv.items():
            m = _SESSION.fullmatch(key)
            if m and turns:
                dates[int(m.group(1))] = parse_session_date(conv[f"{key}_date_time"])
                speaker_of.update({t["dia_id"]: t["speaker"] for t in turns})
        valid = set(speaker_of)
        for key, by_speaker in sorted(
            raw["observation"].items(), key=lambda kv: int(re.search(r"\d+", kv[0]).group())  # type: ignore[union-attr]
        ):
            n = int(re.search(r"\d+", key).group())  # type: ignore[union-attr]
            if n not in dates:
                continue
            for speaker, facts in by_speaker.items():
                user = f"{conv_id}/{speaker}"
                kept = [(t, ids) for t, src in facts if (ids := normalise_ids(src, valid))]
                for start in range(0, len(kept), BLOCK_FACTS):
                    per_user.setdefault(user, []).append(
                        Block(conv_id, user, n, dates[n], kept[start : start + BLOCK_FACTS])
                    )
        now = max(dates.values()) + timedelta(days=1)
        for q in raw["qa"]:
            evidence = normalise_ids(q["evidence"], valid)
            if not evidence:
                continue
            votes = Counter(speaker_of[e] for e in evidence)
            speaker = max(votes, key=lambda s: (votes[s], s == conv["speaker_a"]))
            asks.append(Ask(conv_id, f"{conv_id}/{speaker}", q["question"], int(q["category"]),
                            evidence, now))
    return list(_round_robin(per_user)), asks


def _round_robin(per_user: dict[str, list[Block]]) -> Iterator[Block]:
    """One block of each user in turn, so neighbouring rowids belong to different users."""
    queues = [list(blocks) for blocks in per_user.values()]
    while any(queues):
        for queue in queues:
            if queue:
                yield queue.pop(0)


# --- writing through the proxy's path -----------------------------------------------------------


@contextmanager
def writer_clock() -> Iterator[Callable[[datetime], None]]:
    """The write path's clock (`utcnow` where drafts, supersessions and reinforcements read it),
    set by the caller to the date of the block being applied."""
    current: list[datetime] = [memory_models.utcnow()]
    modules = (memory_models, memory_writer, memory_unit)
    saved = [m.utcnow for m in modules]
    for m in modules:
        m.utcnow = lambda: current[0]  # type: ignore[attr-defined]
    try:
        yield lambda when: current.__setitem__(0, when)
    finally:
        for m, fn in zip(modules, saved, strict=True):
            m.utcnow = fn  # type: ignore[attr-defined]


async def write_blocks(mem: HierarchicalMemory, blocks: list[Block]) -> float:
    """Every block through `submit` (outbox → writer: dedup, changed facts, bubbling), one at a
    time so each is applied at its own date."""
    started = time.perf_counter()
    await mem.start()
    with writer_clock() as set_clock:
        for i, block in enumerate(blocks):
            set_clock(block.when)
            ops = MemoryOps(add=tuple(AddOp(text) for text, _ in block.facts))
            scope = Scope(block.user, session_id=f"{block.conv}/session-{block.session}")
            await mem.submit(ops, scope, request_id=f"bench-{i}")
            await mem.drain(timeout=60)
    return time.perf_counter() - started


async def evidence_map(
    mem: HierarchicalMemory, blocks: list[Block]
) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Each current memory's source turns (the facts stored under their own text; a fact dedup
    merged into a memory, or a changed one replaced, counts for its nearest memory), and the
    turns each user's current memories cover."""
    by_user: dict[str, list[tuple[str, list[str]]]] = {}
    for block in blocks:
        by_user.setdefault(block.user, []).extend(block.facts)
    out: dict[str, set[str]] = {}
    covered: dict[str, set[str]] = {}
    for user, facts in by_user.items():
        memories = await mem.query(MemoryFilter(user_id=user, all_scopes=True, limit=None))
        by_text = {m.content: m.id for m in memories}
        for text, ids in facts:
            memory_id = by_text.get(text.strip())
            if memory_id is None:
                near = await mem.search(text, user_id=user, top_k=1)
                if not near:
                    continue
                memory_id = near[0].memory.id
            out.setdefault(memory_id, set()).update(ids)
            covered.setdefault(user, set()).update(ids)
    return out, covered


# --- asking the way the proxy asks --------------------------------------------------------------


def proxy_query(question: str) -> str:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": question},
    ]
    return cap_query(query_text(messages))


def parse_preset(spec: str) -> RecallPreset:
    """A preset by name, or a variant of one: `default:w_recency=0+length_cap_chars=0`
    (`stop_words=plain` drops the request words from the stop words, `=request` adds them)."""
    base, _, changes = spec.partition(":")
    if base not in PRESETS:
        raise SystemExit(f"unknown preset {base!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[base]
    fields: dict[str, Any] = {}
    for change in filter(None, changes.split("+")):
        key, _, value = change.partition("=")
        if key == "stop_words":
            fields[key] = STOP_WORDS | (REQUEST_WORDS if value == "request" else frozenset())
            continue
        current = getattr(preset, key)
        kind = type(current)
        fields[key] = (value.casefold() in ("1", "true", "yes")) if kind is bool else kind(value)
    return replace(preset, name=spec, **fields)


async def injected(
    mem: HierarchicalMemory, query: str, user: str, top_k: int, now: datetime,
    preset: RecallPreset,
) -> tuple[list[Memory], int]:
    """What the proxy would inject for `query`, and its tokens (the memory message's text)."""
    memories = await mem.recall(
        query, user_id=user, top_k=top_k, now=now, touch=False, preset=preset
    )
    rendered = render_memories(memories, TOKEN_BUDGET)
    return memories[: rendered.count], estimate_tokens(rendered.content or "")


async def evaluate(
    mem: HierarchicalMemory, asks: list[Ask], sources: Callable[[Memory], set[str]],
    preset: RecallPreset,
) -> tuple[list[dict[str, Any]], list[float]]:
    rows: list[dict[str, Any]] = []
    latency: list[float] = []
    for ask in asks:
        query = proxy_query(ask.text)
        t0 = time.perf_counter()
        five, tokens = await injected(mem, query, ask.user, TOP_K, ask.now, preset)
        latency.append((time.perf_counter() - t0) * 1000)
        ten, _ = await injected(mem, query, ask.user, TOP_K_WIDE, ask.now, preset)
        ranked5 = [sorted(sources(m)) for m in five]
        ranked10 = [sorted(sources(m)) for m in ten]
        rows.append({
            "conv": ask.conv, "category": ask.category, "question": ask.text,
            "R@5": recall_at(ranked5, ask.evidence, TOP_K),
            "R@10": recall_at(ranked10, ask.evidence, TOP_K_WIDE),
            "any@5": float(recall_at(ranked5, ask.evidence, TOP_K) > 0),
            "tokens": float(tokens), "injected": float(len(five)),
        })
    return rows, latency


METRICS = ("R@5", "R@10", "any@5", "tokens", "injected")


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict[str, Any]]] = {
        "overall": rows,
        "dev": [r for r in rows if r["conv"] in DEV],
        "test": [r for r in rows if r["conv"] in TEST],
    }
    for split, convs in (("dev", DEV), ("test", TEST)):
        for cat, name in CATEGORIES.items():
            groups[f"{split} {cat} {name}"] = [
                r for r in rows if r["category"] == cat and r["conv"] in convs
            ]
    out: dict[str, dict[str, float]] = {}
    for name, group in groups.items():
        if group:
            out[name] = {"n": float(len(group))} | {
                m: (100.0 if m.startswith(("R@", "any")) else 1.0)
                * statistics.fmean(r[m] for r in group)
                for m in METRICS
            }
    return out


def print_table(title: str, summary: dict[str, dict[str, float]], latency: list[float]) -> None:
    print(f"\n== {title} ==")
    print(f"{'group':<24}{'n':>6}" + "".join(f"{m:>10}" for m in METRICS))
    for name, row in summary.items():
        print(f"{name:<24}{row['n']:>6.0f}" + "".join(f"{row[m]:>10.1f}" for m in METRICS))
    print(f"recall() incl. query embedding: p50 {percentile(latency, 50):.2f} ms, "
          f"p99 {percentile(latency, 99):.2f} ms")


# --- run ----------------------------------------------------------------------------------------


async def run_presets(
    mem: HierarchicalMemory, presets: list[str], asks: list[Ask],
    sources: Callable[[Memory], set[str]], mode: str,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in presets:
        rows, latency = await evaluate(mem, asks, sources, parse_preset(name))
        summary = summarise(rows)
        print_table(f"mode={mode} preset={name}", summary, latency)
        results[name] = {"summary": summary, "recall_p50_ms": percentile(latency, 50)}
    return results


async def run_facts(args: argparse.Namespace, presets: list[str], tmp: str) -> dict[str, Any]:
    blocks, asks = load_facts(Path(args.data), DEV + TEST)
    asks = [a for a in asks if a.conv in _split(args.split)]
    config = MemoryConfig(
        db_path=str(Path(args.db_dir or tmp) / "facts.db"),
        embedder_runtime=args.embedder_runtime, query_embedding_cache_size=8192,
    )
    reuse = Path(str(config.db_path)).exists()
    mem = await HierarchicalMemory.create(config)
    try:
        seconds = 0.0 if reuse else await write_blocks(mem, blocks)
        sources_of, covered = await evidence_map(mem, blocks)
        stats = await mem.stats()
        facts = sum(len(b.facts) for b in blocks)
        print(f"facts: {facts} facts in {len(blocks)} blocks over "
              f"{len({b.user for b in blocks})} users -> {stats.get('current', stats)} current "
              f"memories; written in {seconds:.1f} s; {len(asks)} questions", flush=True)
        ceiling = statistics.fmean(
            recall_at([sorted(covered.get(a.user, set()))], a.evidence, 1) for a in asks
        )
        print(f"ceiling (evidence turns the asking user's facts cover): {100 * ceiling:.1f}")
        results = await run_presets(
            mem, presets, asks, lambda m: sources_of.get(m.id, set()), "facts"
        )
    finally:
        await mem.close()
    return {"facts": len(blocks), "ceiling": 100 * ceiling, "presets": results}


async def run_turns(args: argparse.Namespace, presets: list[str], tmp: str) -> dict[str, Any]:
    convs = load_turns(Path(args.data), "turns", DEV + TEST)
    config = MemoryConfig(
        db_path=str(Path(args.db_dir or tmp) / "turns.db"),
        embedder_runtime=args.embedder_runtime, query_embedding_cache_size=8192,
    )
    reuse = Path(str(config.db_path)).exists()
    mem = await HierarchicalMemory.create(config)
    try:
        seconds = 0.0 if reuse else await ingest_turns(mem, convs)
        asks = [
            Ask(c.id, c.id, q.text, q.category, q.evidence, c.last + timedelta(days=1))
            for c in convs for q in c.questions if c.id in _split(args.split)
        ]
        print(f"turns: {sum(len(c.items) for c in convs)} memories in {seconds:.1f} s; "
              f"{len(asks)} questions", flush=True)
        results = await run_presets(
            mem, presets, asks, lambda m: set(m.metadata.get("dia_ids", [])), "turns"
        )
    finally:
        await mem.close()
    return {"presets": results}


def _split(name: str) -> tuple[str, ...]:
    return {"dev": DEV, "test": TEST, "all": DEV + TEST}[name]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    presets = args.presets.split(",")
    for name in presets:
        parse_preset(name)  # fail before the long part
    out: dict[str, Any] = {"split": args.split}
    with tempfile.TemporaryDirectory() as tmp:
        if args.mode in ("facts", "both"):
            out["facts"] = await run_facts(args, presets, tmp)
        if args.mode in ("turns", "both"):
            out["turns"] = await run_turns(args, presets, tmp)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("facts", "turns", "both"), default="both")
    parser.add_argument(
        "--presets", default="default,bm25",
        help="comma-separated presets, or variants: default:w_recency=0+length_cap_chars=0",
    )
    parser.add_argument("--split", choices=("dev", "test", "all"), default="all",
                        help="the questions asked (the database always holds every conversation)")
    parser.add_argument("--data", default=str(default_data_path()))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--db-dir", help="keep the databases here and reuse them if they exist")
    parser.add_argument(
        "--embedder-runtime", default="auto",
        help="MemoryConfig.embedder_runtime; auto is the product's default (int8 queries on "
        "CPUs with VNNI). Stored memories are float under onnx and onnx-int8 alike, so one "
        "--db-dir serves both",
    )
    args = parser.parse_args(argv)
    out = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
