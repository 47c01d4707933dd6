"""Docs that cannot drift: every CLI command has help text and a place in the README, and every
option says what it does (the way sqlite-utils' tests/test_docs.py keeps its CLI honest)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from headroom import cli

README = Path(__file__).resolve().parent.parent / "README.md"


def _walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(typer.main.get_command(cli.app)))
LEAVES = [(path, c) for path, c in COMMANDS if path and not hasattr(c, "commands")]


def _name(path: tuple[str, ...]) -> str:
    return " ".join(("headroom", *path))


def test_the_tree_has_every_command() -> None:
    names = {_name(path) for path, _ in LEAVES}
    expected = {"headroom serve", "headroom stats", "headroom doctor"} | {
        f"headroom memories {c}"
        for c in ("list", "search", "show", "history", "add", "update", "forget", "purge",
                  "export", "import")
    } | {f"headroom outbox {c}" for c in ("status", "dead", "redrive")} | {
        f"headroom keys {c}" for c in ("create", "list", "revoke", "copy")
    }
    assert names == expected


@pytest.mark.parametrize("path,command", COMMANDS, ids=[_name(p) for p, _ in COMMANDS])
def test_every_command_has_help(path: tuple[str, ...], command: Any) -> None:
    assert (command.help or "").strip(), f"{_name(path)} has no help text"


@pytest.mark.parametrize("path,command", COMMANDS, ids=[_name(p) for p, _ in COMMANDS])
def test_every_option_and_argument_has_help(path: tuple[str, ...], command: Any) -> None:
    missing = [
        p.name for p in command.params
        if not (getattr(p, "help", None) or "").strip() and p.name != "help"
    ]
    assert not missing, f"{_name(path)}: no help for {missing}"


@pytest.mark.parametrize("path", [p for p, _ in LEAVES], ids=[_name(p) for p, _ in LEAVES])
def test_every_command_is_in_the_readme(path: tuple[str, ...]) -> None:
    assert README.exists(), "README.md is missing"
    assert _name(path) in README.read_text(encoding="utf-8"), (
        f"README.md does not mention `{_name(path)}`"
    )
