"""int8 weights for the exported ONNX model: onnxruntime's dynamic quantization of every MatMul's
weights (per output channel), written once beside the float export and reused after.

On a CPU with VNNI (AVX-512 VNNI or AVX-VNNI, as on recent Xeons) the int8 MatMuls make one query
~2x cheaper (OnnxEmbedder runs int8 texts one at a time: see its embed). The vectors stay close
to the float model's (mean cosine 0.9923, lowest 0.973 over 1,200 LoCoMo turns and questions;
bench/embed_bench.py measures it), close enough to search memories the float model embedded.
Without VNNI it does not pay (measured on an AVX2-only AMD machine: bench/RESULTS.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from ..errors import EmbedderError
from ._staged import staged_dir

__all__ = ["INT8_SUFFIX", "quantize_export", "quantized_dir_for"]

log = logging.getLogger("headroom.embedders")

# Bump when the quantization settings change, so an old int8 copy is not reused.
INT8_SUFFIX = "-int8-1"
_MODEL_FILE = "model.onnx"
_META_FILE = "meta.json"


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
