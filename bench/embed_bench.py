"""Latency of one short query embedding (p50/p99) for each local runtime and thread count.

    python bench/embed_bench.py [--runs 200] [--variants torch-1,onnx-1,...]

Each variant runs in its own process: torch's thread count and OpenMP settings are process-wide.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUERY = "what language should I use for my microservice?"
AGREEMENT_TEXTS = [
    QUERY,
    "I prefer Python with FastAPI for backend services.",
    "hi",
    "The user's dog is called Biscuit and is afraid of thunderstorms. " * 40,
]
VARIANTS = ["torch-1", "torch-2", "onnx-1", "onnx-2", "onnx_int8-1", "onnx_int8-2"]


def _int8_cache(fp32_dir: Path, target_cache: Path) -> None:
    """A copy of the fp32 export whose model.onnx is dynamically quantised (int8 MatMul weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = target_cache / fp32_dir.name
    if (target / "meta.json").exists():
        return
    shutil.copytree(fp32_dir, target, dirs_exist_ok=True)
    quantize_dynamic(
        str(fp32_dir / "model.onnx"),
        str(target / "model.onnx"),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
    )


def run_variant(variant: str, runs: int, cache_dir: Path) -> dict[str, object]:
    runtime, threads_text = variant.rsplit("-", 1)
    threads = int(threads_text)
    from headroom.memory.embedders import LocalEmbedder, OnnxEmbedder

    started = time.perf_counter()
    embedder: LocalEmbedder | OnnxEmbedder
    if runtime == "torch":
        embedder = LocalEmbedder(torch_threads=threads)
    elif runtime == "onnx":
        embedder = OnnxEmbedder(threads=threads, cache_dir=cache_dir / "fp32")
    elif runtime == "onnx_int8":
        fp32 = OnnxEmbedder(cache_dir=cache_dir / "fp32")
        fp32.load()
        _int8_cache(fp32.export_dir, cache_dir / "int8")
        embedder = OnnxEmbedder(threads=threads, cache_dir=cache_dir / "int8")
    else:
        raise SystemExit(f"unknown variant {variant}")
    embedder.load()
    load_s = time.perf_counter() - started
    for _ in range(20):
        embedder.embed([QUERY])
    timings = []
    for _ in range(runs):
        t0 = time.perf_counter()
        embedder.embed([QUERY])
        timings.append((time.perf_counter() - t0) * 1000)
    return {
        "variant": variant,
        "load_s": round(load_s, 2),
        "p50_ms": round(float(np.percentile(timings, 50)), 2),
        "p99_ms": round(float(np.percentile(timings, 99)), 2),
        "vectors": embedder.embed(AGREEMENT_TEXTS).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--cache-dir", type=Path, default=None, help="ONNX exports (default: temp)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cache_dir = args.cache_dir or Path(tempfile.gettempdir()) / "headroom-embed-bench"
    if args.child:
        print(json.dumps(run_variant(args.child, args.runs, cache_dir)))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} cpus; {args.runs} runs")
    results = []
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--child", variant, "--runs", str(args.runs)]
        command += ["--cache-dir", str(cache_dir)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    torch_runs = [r for r in results if str(r["variant"]).startswith("torch")]
    reference = np.asarray((torch_runs or results)[0]["vectors"])
    print(f"{'variant':<12} {'load s':>7} {'p50 ms':>7} {'p99 ms':>7}  min cosine vs reference")
    for r in results:
        cosine = float(np.min(np.sum(np.asarray(r["vectors"]) * reference, axis=1)))
        timing = f"{r['load_s']:>7} {r['p50_ms']:>7} {r['p99_ms']:>7}"
        print(f"{r['variant']:<12} {timing}  {cosine:.4f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
