"""JSONL export and import. The first line is a header naming the embedding model; each further
line is one memory with every field (history included), so a round trip loses nothing. Import
keeps ids, times and supersession links, skips ids already present, and re-embeds when the file's
model differs from this database's."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import HeadroomMemoryError, ImportFormatError
from .executors import Executors
from .models import Memory, utcnow
from .parts import EngineParts
from .unit_of_work import UnitOfWork

__all__ = ["export_jsonl", "import_jsonl"]

FORMAT = "headroom-memory-export"
_BATCH = 128


@contextlib.contextmanager
def _open(target: str | Path | IO[str], mode: str) -> Iterator[IO[str]]:
    if isinstance(target, (str, Path)):
        with open(target, mode, encoding="utf-8") as fh:
            yield fh
    else:
        yield target


def export_jsonl(parts: EngineParts, dest: str | Path | IO[str], user_id: str | None) -> int:
    """Write the header and every memory (run it on a reader thread); returns the memory
    count."""
    count = 0
    with _open(dest, "w") as out:
        header = {
            "format": FORMAT, "version": 1, "embedding_model": parts.embedder.model_id,
            "exported_at": utcnow().isoformat(), "user_id": user_id,
        }
        out.write(json.dumps(header) + "\n")
        for memory in parts.store.iter_all(user_id):
            out.write(json.dumps(memory.to_dict(with_embedding=True)) + "\n")
            count += 1
    return count


def _parse(source: str | Path | IO[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    with _open(source, "r") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ImportFormatError(number, f"not valid JSON ({exc.msg})") from None
            if not isinstance(data, dict):
                raise ImportFormatError(number, "expected a JSON object")
            yield number, data


def _to_memory(number: int, data: dict[str, Any]) -> Memory:
    for key in ("content", "user_id"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ImportFormatError(number, f"missing or empty {key!r}")
    try:
        memory = Memory.from_dict(data)
    except (HeadroomMemoryError, ValueError, TypeError) as exc:
        raise ImportFormatError(number, str(exc)) from None
    if not 0.0 <= memory.importance <= 1.0:
        raise ImportFormatError(number, "importance must be between 0 and 1")
    return memory


async def import_jsonl(
    parts: EngineParts, executors: Executors, unit: UnitOfWork, source: str | Path | IO[str],
    *, on_progress: Callable[[int], None] | None = None,
    optimize: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, int]:
    """Validate the whole file first (nothing is written if any line is bad), then insert in
    batches, then `optimize` when anything was imported. Returns counts: imported, skipped (id
    already present), reembedded."""
    model = parts.embedder.model_id
    file_model: str | None = None
    memories: list[Memory] = []
    lines = 0
    for number, data in _parse(source):
        lines += 1
        if data.get("format") == FORMAT:
            file_model = data.get("embedding_model")
            continue
        memories.append(_to_memory(number, data))
    if not lines:
        # A header-only export (a user with no memories) imports 0; a file with nothing in it
        # is more likely the wrong file, or a failed export.
        raise ImportFormatError(1, "the file is empty: no export header and no memories")

    counts = {"imported": 0, "skipped": 0, "reembedded": 0}
    dimension = parts.vectors.dimension
    for start in range(0, len(memories), _BATCH):
        batch = memories[start : start + _BATCH]
        stale = [
            m for m in batch
            if (m.embedding_model or file_model) != model
            or m.embedding is None
            or len(m.embedding) != dimension
        ]
        if stale:
            vectors = await executors.embed([m.content for m in stale])
            for m, v in zip(stale, vectors, strict=True):
                m.embedding = np.asarray(v, dtype=np.float32).tolist()
                m.embedding_model = model
            counts["reembedded"] += len(stale)

        def write(batch: list[Memory] = batch) -> tuple[int, int]:
            imported = skipped = 0
            for m in batch:
                if parts.store.rowid_of(m.id) is not None:
                    skipped += 1
                    continue
                vector = np.asarray(m.embedding, dtype=np.float32)
                unit.index_new(m, vector, request_id="import")
                imported += 1
            return imported, skipped

        imported, skipped = await executors.write(write)
        counts["imported"] += imported
        counts["skipped"] += skipped
        if on_progress:
            on_progress(len(batch))
    if counts["imported"] and optimize is not None:
        await optimize()
    return counts
