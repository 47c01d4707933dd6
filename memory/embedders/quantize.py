"""int8 weights for the exported ONNX model: onnxruntime's dynamic quantization of the weight
MatMuls (per output channel), written once beside the float export and reused after.

Seven MatMuls stay float (`FLOAT_MATMULS`): quantizing all of them made one query 2x cheaper
but some vectors drifted to cosine 0.973 from the float model's. A per-node sweep (each MatMul
quantized alone, over the texts the full int8 model got most wrong) put nearly all of that drift
on the feed-forward blocks, whose inputs carry outlier activations that one int8 scale per tensor
cannot hold: the output projection of layers 0-2 and the expansion of layers 1-4. With those in
float, over 950 LoCoMo questions, turns and multi-turn messages the lowest cosine is 0.9936 (p1
0.996, mean 0.998), and one short query costs ~0.68x the float model's CPU time on a Xeon with
AVX-512 VNNI (every MatMul int8: 0.50x; five kept float: 0.62x but lowest 0.9897 on another
sample). bench/embed_bench.py measures both. Without VNNI int8 does not pay (an AVX2-only AMD
machine: bench/RESULTS.md), so `has_vnni` gates it in `make_embedder`'s "auto".
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from ..errors import EmbedderError
from ._staged import staged_dir

__all__ = ["FLOAT_MATMULS", "INT8_SUFFIX", "has_vnni", "quantize_export", "quantized_dir_for"]

log = logging.getLogger("headroom.embedders")

# Bump when the quantization settings change, so an old int8 copy is not reused.
INT8_SUFFIX = "-int8-3"
_MODEL_FILE = "model.onnx"
_META_FILE = "meta.json"
# Node-name endings (BERT layout, as torch.onnx names a sentence-transformers export) of the
# MatMuls kept float: the ones whose quantization moved the vectors most (see above).
FLOAT_MATMULS = (
    "encoder/layer.0/output/dense/MatMul",
    "encoder/layer.1/output/dense/MatMul",
    "encoder/layer.2/output/dense/MatMul",
    "encoder/layer.1/intermediate/dense/MatMul",
    "encoder/layer.2/intermediate/dense/MatMul",
    "encoder/layer.3/intermediate/dense/MatMul",
    "encoder/layer.4/intermediate/dense/MatMul",
)
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has int8 dot-product instructions, where the int8 model pays. False when
    it cannot tell (not Linux): the float model is the safe choice there."""
    try:
        with cpuinfo.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith("flags"):
                    return not _VNNI_FLAGS.isdisjoint(line.split(":", 1)[-1].split())
    except OSError:
        return False
    return False


def _float_nodes(model_file: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    return [
        node.name for node in graph.node
        if node.op_type == "MatMul" and node.name.endswith(FLOAT_MATMULS)
    ]


def quantized_dir_for(export_dir: Path) -> Path:
    return export_dir.with_name(export_dir.name + INT8_SUFFIX)


def quantize_export(export_dir: Path) -> Path:
    """The int8 copy of the float export in `export_dir`, made on first use (a few seconds).

    Written to a temporary directory and renamed into place, as the float export is, so two
    processes quantizing at once both end up with a complete copy.
    """
    target = quantized_dir_for(export_dir)
    if (target / _META_FILE).exists():
        return target
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise EmbedderError(f"int8 quantization needs onnxruntime's quantization tools: {exc}") \
            from exc
    started = time.perf_counter()
    log.info("quantizing the ONNX model to int8 into %s (once)", target)
    try:
        with staged_dir(target, prefix=".quantize-", done_file=_META_FILE,
                        what="the int8 model") as tmp:
            for name in os.listdir(export_dir):
                if name != _MODEL_FILE:
                    shutil.copy2(export_dir / name, tmp / name)
            # The quantizer warns that shape inference was not run first; for this graph the
            # result is the same, and the agreement with the float model is measured in the tests.
            logging.getLogger().disabled, was = True, logging.getLogger().disabled
            try:
                quantize_dynamic(
                    str(export_dir / _MODEL_FILE), str(tmp / _MODEL_FILE),
                    weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["MatMul"],
                    nodes_to_exclude=_float_nodes(export_dir / _MODEL_FILE),
                    # The attention-score MatMuls (both inputs activations) stay float.
                    extra_options={"MatMulConstBOnly": True},
                )
            finally:
                logging.getLogger().disabled = was
    except EmbedderError:
        raise
    except Exception as exc:
        raise EmbedderError(
            f"quantizing {export_dir / _MODEL_FILE} to int8 failed: {type(exc).__name__}: {exc}"
        ) from exc
    log.info("int8 model ready in %.1fs", time.perf_counter() - started)
    return target
