"""The local sentence-transformers model on ONNX Runtime: exported from its torch weights once,
cached on disk, then run without torch (about twice as fast for one short query on one core)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EmbedderError
from ..models import DEFAULT_LOCAL_MODEL
from ._common import empty, l2_normalise, text_list
from ._staged import staged_dir
from .local import (
    known_local_dimension,
    load_sentence_transformer,
    local_model_id,
    resolve_local_model,
    sentence_dimension,
)
from .quantize import quantize_export

__all__ = ["OnnxEmbedder", "default_onnx_cache_dir", "export_onnx"]

# Bump when the exported graph or the files beside it change, so old caches are not reused.
EXPORT_FORMAT = 1
_MODEL_FILE = "model.onnx"
_TOKENIZER_FILE = "tokenizer.json"
_META_FILE = "meta.json"
# Which field of a `tokenizers.Encoding` feeds each model input.
_ENCODING_FIELDS = {
    "input_ids": "ids",
    "attention_mask": "attention_mask",
    "token_type_ids": "type_ids",
}
_INSTALL_HINT = "pip install onnxruntime onnx"


def default_onnx_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("headroom", appauthor=False)) / "onnx"


def _fingerprint(model: str) -> str:
    """Changes when the model's files do (a fine-tune saved in place keeps the file sizes, so
    modification times are part of it); a hub name is keyed by the name alone."""
    digest = hashlib.sha256(f"{EXPORT_FORMAT}\0{local_model_id(model)}".encode())
    source = resolve_local_model(model)
    if source.is_dir:
        root = Path(source.location)
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = file.stat()
            rel = file.relative_to(root).as_posix()
            digest.update(f"\0{rel}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def export_dir_for(model: str, cache_dir: Path) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", local_model_id(model).removeprefix("local:"))
    return cache_dir / f"{slug.strip('_')[-60:]}-{_fingerprint(model)}"


def export_onnx(model: str, target: Path, *, threads: int = 1) -> None:
    """Write `target`/model.onnx (the whole sentence-transformers pipeline: transformer, pooling,
    normalisation), tokenizer.json and meta.json. Needs torch and the `onnx` package, once.

    The files are written to a temporary directory and renamed into place, so a reader never sees
    half an export, and two processes exporting at once both end up with a complete one.
    """
    if importlib.util.find_spec("onnx") is None:
        raise EmbedderError(f"exporting the model to ONNX needs the onnx package: {_INSTALL_HINT}")
    st_model = load_sentence_transformer(model, threads)
    import torch

    tokenizer = st_model.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EmbedderError(f"{model}: the ONNX runtime needs a fast (tokenizers) tokenizer")
    names = list(tokenizer.model_input_names)
    unknown = [n for n in names if n not in _ENCODING_FIELDS]
    if unknown or "input_ids" not in names:
        raise EmbedderError(f"{model}: cannot export a model whose inputs are {names}")

    class Pipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.st = st_model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.st(dict(zip(names, tensors, strict=True)))["sentence_embedding"]

    # Two rows of different lengths, so padding is part of the traced graph.
    sample = tokenizer(
        ["a short sentence", "a somewhat longer sentence, so that the batch needs padding"],
        padding=True,
        return_tensors="pt",
    )
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["embedding"] = {0: "batch"}
    max_length = st_model.max_seq_length or min(int(tokenizer.model_max_length), 512)
    meta = {
        "format": EXPORT_FORMAT,
        "model_id": local_model_id(model),
        "input_names": names,
        "max_seq_length": int(max_length),
        "pad_id": int(tokenizer.pad_token_id or 0),
        "pad_token": str(tokenizer.pad_token or "[PAD]"),
        "dimension": sentence_dimension(st_model),
    }
    try:
        with staged_dir(target, prefix=".export-", done_file=_META_FILE,
                        what="the ONNX export") as tmp:
            # The legacy (TorchScript) exporter needs only `onnx`; the newer one also wants
            # onnxscript. Its tracer warnings are about Python branches that are constant for
            # this graph (the equality with torch is checked in tests/test_embedders.py).
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    Pipeline().eval(),
                    tuple(sample[name] for name in names),
                    str(tmp / _MODEL_FILE),
                    input_names=names,
                    output_names=["embedding"],
                    dynamic_axes=axes,
                    opset_version=17,
                    dynamo=False,
                )
            (tmp / _TOKENIZER_FILE).write_text(backend.to_str(), encoding="utf-8")
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    except EmbedderError:
        raise
    except Exception as exc:
        raise EmbedderError(
            f"exporting {model} to ONNX in {target} failed: {type(exc).__name__}: {exc}"
        ) from exc


class OnnxEmbedder:
    """Implements `memory.ports.Embedder` with ONNX Runtime.

    The same model and `model_id` as `LocalEmbedder`: vectors agree with the torch ones (cosine
    1.0000 for all-MiniLM-L6-v2), so stored memories need no re-embedding when switching runtime.
    The first load exports the model into `cache_dir` (a few seconds, needs torch and `onnx`);
    later loads read the cached file and never import torch.
    """

    def __init__(
        self,
        model: str = DEFAULT_LOCAL_MODEL,
        *,
        threads: int = 1,
        batch_size: int = 64,
        cache_dir: str | Path | None = None,
        quantized: bool = False,
        int8_queries: bool = False,
    ) -> None:
        """`quantized`: run the int8 copy of the model (memory/embedders/quantize.py).
        `int8_queries`: this one stays float, for memory contents, and `query_embedder` is its
        int8 twin, for queries (the engine's query path uses it; `load` loads both)."""
        if threads < 1:
            raise ValueError("threads must be at least 1")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.model_id = local_model_id(model)
        self.threads = threads
        self.batch_size = batch_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_onnx_cache_dir()
        self._dimension = known_local_dimension(model)
        self._session: Any = None
        self._tokenizer: Any = None
        self._input_fields: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.quantized = quantized
        # Same model_id: int8 query vectors search float-made memories (agreement measured).
        self.query_embedder: OnnxEmbedder | None = (
            OnnxEmbedder(
                model, threads=threads, batch_size=batch_size, cache_dir=self.cache_dir,
                quantized=True,
            )
            if int8_queries and not quantized
            else None
        )

    def __repr__(self) -> str:
        extra = ", quantized=True" if self.quantized else ""
        extra += ", int8_queries=True" if self.query_embedder is not None else ""
        return f"OnnxEmbedder({self.model!r}, threads={self.threads}{extra})"

    @property
    def loaded(self) -> bool:
        return self._session is not None

    @property
    def known_dimension(self) -> int | None:
        return self._dimension

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            self.load()
        assert self._dimension is not None
        return self._dimension

    @property
    def export_dir(self) -> Path:
        return export_dir_for(self.model, self.cache_dir)

    def load(self) -> None:
        if self.query_embedder is not None:
            self.query_embedder.load()
        if self._session is not None:
            return
        with self._lock:
            if self._session is not None:
                return
            try:
                import onnxruntime
                from tokenizers import Tokenizer
            except ImportError as exc:
                raise EmbedderError(f"the ONNX embedder needs {exc.name}: {_INSTALL_HINT}") from exc
            target = self.export_dir
            if not (target / _META_FILE).exists():
                export_onnx(self.model, target, threads=self.threads)
            if self.quantized:
                target = quantize_export(target)
            try:
                meta = json.loads((target / _META_FILE).read_text(encoding="utf-8"))
                tokenizer = Tokenizer.from_file(str(target / _TOKENIZER_FILE))
                session = onnxruntime.InferenceSession(
                    str(target / _MODEL_FILE),
                    self._session_options(onnxruntime),
                    providers=["CPUExecutionProvider"],
                )
            except Exception as exc:
                raise EmbedderError(
                    f"could not load the ONNX model in {target} ({type(exc).__name__}: {exc}); "
                    "delete that directory to export it again"
                ) from exc
            tokenizer.no_padding()
            tokenizer.no_truncation()
            tokenizer.enable_truncation(max_length=meta["max_seq_length"])
            tokenizer.enable_padding(pad_id=meta["pad_id"], pad_token=meta["pad_token"])
            self._input_fields = [(name, _ENCODING_FIELDS[name]) for name in meta["input_names"]]
            self._dimension = int(meta["dimension"])
            self._tokenizer = tokenizer
            self._session = session

    def _session_options(self, onnxruntime: Any) -> Any:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Same reason as OMP_WAIT_POLICY=PASSIVE for torch: spinning workers steal shared cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        items = text_list(texts)
        if not items:
            return empty(self.dimension)
        self.load()
        # Similar lengths share a batch, so little of each batch is padding.
        order = sorted(range(len(items)), key=lambda i: len(items[i]))
        out = np.empty((len(items), self.dimension), dtype=np.float32)
        # int8 activations are quantized with one scale per tensor, i.e. per batch: a text's
        # vector would move with its batch-mates (lowest cosine 0.997 to itself alone over 64
        # LoCoMo questions in batches of 8), against the Embedder contract. One at a time keeps
        # every text's vector the same in any batch; it costs concurrent queries ~1.5x the CPU
        # of one batch (bench/embed_bench.py --pipeline).
        step = 1 if self.quantized else self.batch_size
        for chunk in _similar_length_chunks([len(items[i]) for i in order], step):
            rows = [order[i] for i in chunk]
            out[rows] = self._run([items[i] for i in rows])
        return l2_normalise(out)

    def _run(self, texts: list[str]) -> np.ndarray:
        try:
            encodings = self._tokenizer.encode_batch(texts)
            feeds = {
                name: np.array([getattr(e, field) for e in encodings], dtype=np.int64)
                for name, field in self._input_fields
            }
            return self._session.run(None, feeds)[0]
        except Exception as exc:
            raise EmbedderError(f"ONNX embedding failed: {type(exc).__name__}: {exc}") from exc


def _similar_length_chunks(lengths: list[int], batch_size: int) -> list[range]:
    """Runs of `lengths` (sorted ascending) of at most `batch_size` in which the longest is at
    most about twice the shortest: padding is paid for as if it were text, so one long message
    in a batch of short queries would multiply the batch's cost."""
    chunks: list[range] = []
    start = 0
    for i, length in enumerate(lengths):
        if i - start == batch_size or length > 2 * lengths[start] + 16:
            chunks.append(range(start, i))
            start = i
    if start < len(lengths):
        chunks.append(range(start, len(lengths)))
    return chunks
