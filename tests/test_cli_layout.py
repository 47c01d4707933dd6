"""The command line's shape: `cli.py` only assembles the app, each `headroom._cli` module is small,
and none of them speaks SQL or opens a store itself (they go through `HierarchicalMemory` and
`memory.inspect_db`)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import headroom._cli

ROOT = Path(__file__).resolve().parent.parent
CLI_MODULES = sorted(Path(headroom._cli.__file__).parent.glob("*.py"))
SOURCES = [ROOT / "cli.py", *CLI_MODULES]
# Storage internals the CLI must not reach for: it opens the engine, never a connection or table.
FORBIDDEN_IMPORTS = ("memory.db", "memory.adapters", "memory.migrations", "memory.parts",
                     "memory.wiring")
SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|PRAGMA)\b\s+\S+", re.IGNORECASE)
SQL_SHAPE = re.compile(r"\b(FROM|INTO|SET|WHERE|TABLE)\b", re.IGNORECASE)


def _imports(tree: ast.AST) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
            names += [f"{node.module}.{alias.name}" for alias in node.names if node.module]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def test_cli_py_only_assembles_the_app() -> None:
    tree = ast.parse((ROOT / "cli.py").read_text(encoding="utf-8"))
    functions = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert functions == ["main"]
    assert len((ROOT / "cli.py").read_text(encoding="utf-8").splitlines()) < 80


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_no_sql_and_no_store_opened_directly(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    allowed = {"memory.db.sqlite_module", "memory.db.sqlite_versions"}  # error types, versions
    for name in _imports(tree):
        bare = name.lstrip(".")
        if any(bare.startswith(f) for f in FORBIDDEN_IMPORTS):
            assert bare in allowed or bare == "memory.db", f"{path.name} imports {name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            assert not (SQL.search(text) and SQL_SHAPE.search(text)), (path.name, text)
        if isinstance(node, ast.Attribute) and node.attr in ("connect", "execute", "executemany"):
            raise AssertionError(f"{path.name} calls .{node.attr}")


@pytest.mark.parametrize("path", CLI_MODULES, ids=[p.name for p in CLI_MODULES])
def test_each_command_module_is_small(path: Path) -> None:
    assert len(path.read_text(encoding="utf-8").splitlines()) < 400, path.name
