"""int8 weights for the exported ONNX model, written once beside the float export and reused
after: onnxruntime's dynamic quantization of the weight MatMuls (per output channel), and
block-wise int8 for the seven that one activation scale cannot serve.

Dynamic quantization of every MatMul made one query 2x cheaper but some vectors drifted to
cosine 0.973 from the float model's. A per-node sweep (each MatMul quantized alone, over the
texts the full int8 model got most wrong) put nearly all of that drift on the feed-forward
blocks (`BLOCKWISE_MATMULS`), whose inputs carry outlier activations that one int8 scale per
tensor cannot hold: the output projection of layers 0-2 and the expansion of layers 1-4. Those
seven were first kept float (the `-int8-3` copy). They are now `MatMulNBits` with 8-bit weights
in blocks of 128 and activations quantized per row and block (accuracy level 4), so an outlier
costs only its own block's precision. Over 1,200 LoCoMo turns, questions and long messages
(bench/embed_bench.py) the lowest cosine with the float model is 0.9911 (p1 0.9940, mean 0.9977;
with the seven float: 0.9929 / 0.9947 / 0.9980), and every weight MatMul is int8: 12 MB fewer
bytes to bring back into the caches on each query. That is what a query costs in a server,
where the model sits idle between requests: after 5 ms idle one short query took 2.8 ms against
3.4-3.6 ms with the seven float, after 20 ms 3.7-3.8 against 4.6; back to back both take 2.4 ms
(`bench/embed_bench.py --idle 5,20`). Where onnxruntime cannot make or run `MatMulNBits`, the
seven stay float (logged). Without VNNI int8 does not pay (an AVX2-only AMD machine:
bench/RESULTS.md), so `has_vnni` gates it in `make_embedder`'s "auto".
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from ..errors import EmbedderError
from ._staged import staged_dir

__all__ = [
    "BLOCKWISE_MATMULS", "INT8_SUFFIX", "has_vnni", "quantize_export", "quantized_dir_for",
]

log = logging.getLogger("headroom.embedders")

# Bump when the quantization settings change, so an old int8 copy is not reused.
INT8_SUFFIX = "-int8-4"
_MODEL_FILE = "model.onnx"
_META_FILE = "meta.json"
# Node-name endings (BERT layout, as torch.onnx names a sentence-transformers export) of the
# MatMuls quantized block-wise: the ones whose dynamic quantization moved the vectors most.
BLOCKWISE_MATMULS = (
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


# Weights per scale along the input dimension (384 for MiniLM: 3 blocks a column). Blocks of 32
# agree a little better (lowest cosine 0.9931) but cost more than they save.
_BLOCK_SIZE = 128
_ACTIVATIONS_INT8 = 4  # MatMulNBits accuracy level: int8 activations, per row and block


def _blockwise_nodes(model_file: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    return [
        node.name for node in graph.node
        if node.op_type == "MatMul" and node.name.endswith(BLOCKWISE_MATMULS)
    ]


def _quantize_blockwise(model_file: Path, nodes: list[str]) -> str | None:
    """`nodes` of `model_file` as 8-bit `MatMulNBits`, in place. None when done; else why they
    stay float: this onnxruntime cannot make the op (its quantizer needs `onnx_ir`) or run it."""
    try:
        import onnxruntime
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        return f"onnxruntime's MatMulNBits quantizer is unavailable ({exc})"
    staged = model_file.with_name("blockwise-" + model_file.name)
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # it logs every node it skips
    try:
        quantizer = MatMulNBitsQuantizer(
            str(model_file), bits=8, block_size=_BLOCK_SIZE, is_symmetric=True,
            accuracy_level=_ACTIVATIONS_INT8, nodes_to_include=nodes,
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(staged), use_external_data_format=False)
        # An onnxruntime that writes the op may still lack the kernel for 8 bits: load it here,
        # not at the first query.
        onnxruntime.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
    except Exception as exc:
        staged.unlink(missing_ok=True)
        return f"{type(exc).__name__}: {exc}"
    finally:
        quiet.setLevel(level)
    staged.replace(model_file)
    return None


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
            blockwise = _blockwise_nodes(export_dir / _MODEL_FILE)
            try:
                quantize_dynamic(
                    str(export_dir / _MODEL_FILE), str(tmp / _MODEL_FILE),
                    weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["MatMul"],
                    nodes_to_exclude=blockwise,
                    # The attention-score MatMuls (both inputs activations) stay float.
                    extra_options={"MatMulConstBOnly": True},
                )
            finally:
                logging.getLogger().disabled = was
            why_not = _quantize_blockwise(tmp / _MODEL_FILE, blockwise)
            if why_not is not None:
                log.warning("the %d feed-forward MatMuls of the int8 model stay float (queries "
                            "cost ~1 ms more): %s", len(blockwise), why_not)
    except EmbedderError:
        raise
    except Exception as exc:
        raise EmbedderError(
            f"quantizing {export_dir / _MODEL_FILE} to int8 failed: {type(exc).__name__}: {exc}"
        ) from exc
    log.info("int8 model ready in %.1fs", time.perf_counter() - started)
    return target
