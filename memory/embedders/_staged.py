"""A model folder written beside its final place and renamed into it in one step."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import EmbedderError

__all__ = ["staged_dir"]


@contextmanager
def staged_dir(target: Path, *, prefix: str, done_file: str, what: str) -> Iterator[Path]:
    """A temporary folder beside `target`, renamed to `target` when the block ends without an
    error: a reader never sees half of it, and when two processes make the same folder at once
    the one that loses the rename keeps the winner's copy (its `done_file` is there). `what`
    names the folder in the error for a parent that cannot be written."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))
    except OSError as exc:
        raise EmbedderError(f"cannot write {what} to {target.parent}: {exc}") from exc
    try:
        yield tmp
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / done_file).exists():
                raise
            # Another process finished the same folder first; its copy is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
