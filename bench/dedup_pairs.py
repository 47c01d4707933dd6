"""Restated vs changed: the dedup decision scored on the labelled pairs, with MiniLM's cosines.

    HF_HUB_OFFLINE=1 python bench/dedup_pairs.py [--no-write]

Prints the accuracy, the confusion matrix and every pair with its real cosine (the local
embedder of a default `MemoryConfig`), and replaces the "Restated vs changed facts" section at
the end of bench/RESULTS.md unless --no-write. The cosines show why the rule exists: the engine
treats a pair at or above `dedup_threshold` as one fact unless `is_changed_fact` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from headroom.memory.dedup import is_changed_fact
from headroom.memory.embedders import make_embedder
from headroom.memory.models import MemoryConfig

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ROOT / "tests" / "data" / "restated_vs_changed.jsonl"
RESULTS = ROOT / "bench" / "RESULTS.md"
HEADING = "## Restated vs changed facts"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def report(pairs: list[dict[str, str]], cosines: np.ndarray, threshold: float) -> str:
    predicted = ["changed" if is_changed_fact(p["old"], p["new"]) else "restated" for p in pairs]
    confusion = {
        (truth, guess): sum(
            1 for p, g in zip(pairs, predicted, strict=True) if p["label"] == truth and g == guess
        )
        for truth in ("changed", "restated")
        for guess in ("changed", "restated")
    }
    right = confusion[("changed", "changed")] + confusion[("restated", "restated")]
    near = cosines >= threshold
    changed_near = sum(
        1 for p, n in zip(pairs, near, strict=True) if n and p["label"] == "changed"
    )
    lines = [
        HEADING,
        "",
        f"`bench/dedup_pairs.py` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_model()}; "
        f"{len(pairs)} labelled pairs in `tests/data/restated_vs_changed.jsonl` "
        f"({sum(p['label'] == 'changed' for p in pairs)} changed, "
        f"{sum(p['label'] == 'restated' for p in pairs)} restated). "
        "Rule: `memory/dedup.py` `is_changed_fact(old, new)`; cosine: the default local "
        "embedder (MiniLM).",
        "",
        f"**Accuracy {right}/{len(pairs)} = {right / len(pairs):.1%}.** "
        f"{int(near.sum())} pairs reach the dedup threshold ({threshold}), "
        f"{changed_near} of them changed facts that a cosine-only check would have reinforced.",
        "",
        "| truth \\ rule | changed | restated |",
        "|---|---|---|",
        f"| changed | {confusion[('changed', 'changed')]} | "
        f"{confusion[('changed', 'restated')]} |",
        f"| restated | {confusion[('restated', 'changed')]} | "
        f"{confusion[('restated', 'restated')]} |",
        "",
        "| cosine | truth | rule | old | new |",
        "|---|---|---|---|---|",
    ]
    order = np.argsort(-cosines)
    for i in order:
        p, guess = pairs[i], predicted[i]
        mark = "" if guess == p["label"] else " ✗"
        lines.append(
            f"| {cosines[i]:.3f} | {p['label']} | {guess}{mark} | {_cell(p['old'])} | "
            f"{_cell(p['new'])} |"
        )
    return "\n".join(lines) + "\n"


def write_section(section: str) -> None:
    text = RESULTS.read_text(encoding="utf-8")
    start = text.find(HEADING)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(HEADING))
        text = text[:start] + section + ("" if end == -1 else text[end:])
    RESULTS.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    pairs = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines() if line]
    config = MemoryConfig(db_path=":memory:")
    embedder = make_embedder(config)
    old = embedder.embed([p["old"] for p in pairs])
    new = embedder.embed([p["new"] for p in pairs])
    cosines = np.einsum("ij,ij->i", old, new)  # the vectors are L2-normalised
    section = report(pairs, cosines, config.dedup_threshold)
    print(section)
    if not args.no_write:
        write_section(section)
        print(f"updated {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    closer = getattr(embedder, "close", None)
    if callable(closer):
        closer()


if __name__ == "__main__":
    main()
