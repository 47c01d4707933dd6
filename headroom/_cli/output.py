"""What commands print: rich consoles and tables for people, JSON for scripts, progress bars on a
terminal's stderr."""

import contextlib
import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..memory.models import Memory

__all__ = [
    "counts_table",
    "err",
    "memory_table",
    "out",
    "print_json",
    "progress",
    "short",
    "size",
    "status",
    "table",
    "when",
    "working",
]


def out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def err() -> Console:
    return Console(stderr=True, highlight=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):  # the audit trail's times
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=_json_default))


def when(value: datetime | None, *, empty: str = "") -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else empty


def status(memory: Memory) -> str:
    if memory.forgotten_at is not None:
        return "forgotten"
    return "current" if memory.is_current else "superseded"


def short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def table(title: str | None = None, *numbers: str) -> Table:
    """A compact table; `numbers` are the right-aligned leading columns."""
    grid = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
        collapse_padding=True, pad_edge=False,
    )
    for name in numbers:
        grid.add_column(name, justify="right", no_wrap=True)
    return grid


def memory_table(
    memories: Sequence[Memory], numbers: Sequence[str] = (),
    leading: Sequence[Sequence[str]] | None = None,
) -> Table:
    """One row per memory, after the `numbers` columns (`leading` holds their cells); a status
    column only when some memory is not current (superseded or forgotten)."""
    grid = table(None, *numbers)
    for name in ("id", "scope", "category", "imp", "created"):
        grid.add_column(name, no_wrap=True, justify="right" if name == "imp" else "left")
    with_status = any(not m.is_current for m in memories)
    if with_status:
        grid.add_column("status", no_wrap=True)
    grid.add_column("content", min_width=16, ratio=1)
    for i, m in enumerate(memories):
        cells = [
            m.id[:8], m.scope_level.value, m.category.value, f"{m.importance:.2f}",
            m.created_at.strftime("%Y-%m-%d"), *([status(m)] if with_status else []),
            escape(short(m.content, 120)),
        ]
        grid.add_row(*(leading[i] if leading else ()), *cells)
    return grid


def counts_table(title: str, counts: dict[str, int]) -> Table:
    grid = table(title)
    grid.add_column(title.removeprefix("by "))
    grid.add_column("current", justify="right")
    for key, value in counts.items():
        grid.add_row(escape(key), str(value))
    return grid


def progress(console: Console, label: str) -> Progress:
    """A progress bar on stderr, drawn only when stderr is a terminal."""
    return Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, disable=not console.is_terminal, transient=True,
    )


@contextlib.contextmanager
def working(label: str) -> Iterator[None]:
    """A spinner with `label` on stderr while slow work runs (a model load, a big purge), drawn
    only when stderr is a terminal and cleared when done."""
    console = err()
    if not console.is_terminal:
        yield
        return
    with console.status(label):
        yield
