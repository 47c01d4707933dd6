"""Errors on the command line: a library error is one `error: <message>` line on stderr and exit
code 1; usage errors stay typer's own (exit code 2); `--debug` shows the traceback instead."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer

from ..memory.errors import HeadroomMemoryError

__all__ = ["DEBUG_KEY", "CommandError", "RootGroup", "describe"]

# Where the root callback leaves `--debug` for RootGroup to read (click's per-run context meta).
DEBUG_KEY = "headroom.debug"


class CommandError(Exception):
    """A user's mistake the library does not name (no database there, ambiguous short id)."""


def expected(exc: BaseException) -> bool:
    """Errors a user can cause (bad id, bad file, unreadable database) rather than bugs."""
    import sqlite3

    from ..memory.db import sqlite_module

    try:
        sqlite_errors: tuple[type[BaseException], ...] = (sqlite3.Error, sqlite_module().Error)
    except HeadroomMemoryError:
        sqlite_errors = (sqlite3.Error,)
    known = (CommandError, HeadroomMemoryError, OSError, UnicodeDecodeError, *sqlite_errors)
    return isinstance(exc, known)


def describe(exc: BaseException) -> str:
    """One line, whatever the message: some wrapped errors (hub downloads) span several."""
    return " ".join(_message(exc).split())


def _message(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    if isinstance(exc, (CommandError, HeadroomMemoryError)):
        return str(exc)
    return f"database error: {exc}"


class RootGroup(typer.core.TyperGroup):
    """The root group: every command runs inside its `invoke`, so errors are translated once."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # `headroom ... | head`: the reader left, nothing to report
            _silence_stdout()
            raise typer.Exit(1) from None
        except Exception as exc:
            if ctx.meta.get(DEBUG_KEY) or not expected(exc):
                raise
            typer.echo(f"error: {describe(exc)}", err=True)
            raise typer.Exit(1) from exc


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again (the
    recipe in the Python docs for SIGPIPE)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (tests)
        pass
