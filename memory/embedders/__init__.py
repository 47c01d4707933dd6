"""Embedding backends (local torch or ONNX Runtime, OpenAI, Ollama), a query-embedding cache, a
micro-batcher for concurrent queries, and `make_embedder(config)`, which picks one from a
`MemoryConfig`."""

from __future__ import annotations

import importlib.util
import logging

from ..errors import ConfigError
from ..models import DEFAULT_LOCAL_MODEL, EmbedderBackend, MemoryConfig
from ..ports import Embedder
from .batching import BatchingEmbedder
from .cached import CachedEmbedder
from .local import LocalEmbedder, import_torch, local_model_id
from .ollama import OllamaEmbedder
from .onnx import OnnxEmbedder
from .openai import OPENAI_DIMENSIONS, OpenAIEmbedder
from .quantize import has_vnni

__all__ = [
    "LOCAL_RUNTIMES",
    "BatchingEmbedder",
    "CachedEmbedder",
    "LocalEmbedder",
    "OllamaEmbedder",
    "OnnxEmbedder",
    "OpenAIEmbedder",
    "import_torch",
    "make_embedder",
    "resolve_runtime",
]

log = logging.getLogger("headroom.embedders")

# "onnx-int8": memory contents on the float ONNX model, queries on its int8 copy (quantize.py);
# what "auto" picks for the default model on a CPU with VNNI.
LOCAL_RUNTIMES = ("torch", "onnx", "onnx-int8")
# These answer `dimensions` with an error, so a different vector_dimension is a config mistake.
_FIXED_SIZE_OPENAI = frozenset({"text-embedding-ada-002"})

_Built = LocalEmbedder | OnnxEmbedder | OpenAIEmbedder | OllamaEmbedder


def resolve_runtime(runtime: str, model: str = DEFAULT_LOCAL_MODEL) -> str:
    """"auto" means ONNX Runtime when it (and onnx, for the one-time export) is installed, with
    queries on the int8 copy where that was measured to agree with the float model (the default
    MiniLM: lowest cosine 0.994, memory/embedders/quantize.py) and the CPU makes it pay (VNNI)."""
    if runtime != "auto":
        return runtime
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        measured = local_model_id(model) == local_model_id(DEFAULT_LOCAL_MODEL)
        return "onnx-int8" if measured and has_vnni() else "onnx"
    log.info("onnxruntime/onnx not installed: the local embedder runs on torch (slower queries)")
    return "torch"


def make_embedder(config: MemoryConfig) -> Embedder:
    """The embedder `config` asks for, not yet loaded (a local model loads on first use).

    Raises ConfigError when `config.vector_dimension` contradicts a dimension known without
    loading anything; otherwise the mismatch shows up as an EmbedderError on first use.
    """
    model = config.embedder_model
    if not model:
        raise ConfigError("embedder_model must not be empty")
    embedder: _Built
    if config.embedder_backend is EmbedderBackend.LOCAL:
        runtime = resolve_runtime(config.embedder_runtime, model)
        if runtime == "torch":
            embedder = LocalEmbedder(
                model, torch_threads=config.torch_threads, batch_size=config.embed_batch_size
            )
        elif runtime in ("onnx", "onnx-int8"):
            embedder = OnnxEmbedder(
                model, threads=config.torch_threads, batch_size=config.embed_batch_size,
                int8_queries=runtime == "onnx-int8",
            )
        else:
            expected = ", ".join(LOCAL_RUNTIMES)
            raise ConfigError(f"unknown embedder_runtime {runtime!r}; expected one of: {expected}")
    elif config.embedder_backend is EmbedderBackend.OPENAI:
        wanted = config.vector_dimension
        shorten = (
            wanted is not None
            and wanted != OPENAI_DIMENSIONS.get(model)
            and model not in _FIXED_SIZE_OPENAI
        )
        embedder = OpenAIEmbedder(
            model,
            api_key=config.openai_api_key,
            base_url=config.openai_base_url,
            dimension=wanted if shorten else None,
            batch_size=config.embed_batch_size,
        )
    elif config.embedder_backend is EmbedderBackend.OLLAMA:
        embedder = OllamaEmbedder(
            model, base_url=config.ollama_base_url, batch_size=config.embed_batch_size
        )
    else:  # pragma: no cover - MemoryConfig validates the enum
        raise ConfigError(f"unknown embedder_backend {config.embedder_backend!r}")
    known, wanted = embedder.known_dimension, config.vector_dimension
    if wanted is not None and known is not None and known != wanted:
        if isinstance(embedder, OpenAIEmbedder | OllamaEmbedder):
            embedder.close()
        raise ConfigError(f"vector_dimension {wanted} does not match model {model} ({known})")
    return embedder
