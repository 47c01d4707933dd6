"""The engine's module layout: no import cycle (function-level and TYPE_CHECKING imports
included), and `HierarchicalMemory` is a facade nothing else reaches into."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "memory"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
FACADE = f"{PACKAGE}.hierarchical"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        out[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return out


SOURCES = _sources()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name `from <node.module> import …` names, inside this package."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(sources: dict[str, tuple[Path, ast.Module]]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body. `from pkg import name`
    counts as importing `pkg.name` when that is a module, else `pkg` itself."""
    graph: dict[str, set[str]] = {name: set() for name in sources}
    for module, (path, tree) in sources.items():
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in sources else base)
            for target in targets:
                if target in sources and target != module:
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def _facade_privates() -> set[str]:
    """Private names `HierarchicalMemory` defines: its `_methods` and its `self._attrs`."""
    _, tree = SOURCES[FACADE]
    cls = next(
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "HierarchicalMemory"
    )
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif (
            isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "self" and isinstance(node.ctx, ast.Store)
        ):
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.endswith("__")}


def test_the_graph_sees_function_level_imports() -> None:
    """The checks below would pass vacuously if the parser missed nested imports."""
    sources = {
        "memory.a": (ROOT / "a.py", ast.parse("def f():\n    from .b import x\n")),
        "memory.b": (ROOT / "b.py", ast.parse(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
        )),
    }
    graph = import_graph(sources)
    assert graph == {"memory.a": {"memory.b"}, "memory.b": {"memory.a"}}
    assert find_cycle(graph) == ["memory.a", "memory.b", "memory.a"]


def test_the_engine_has_no_import_cycle() -> None:
    graph = import_graph(SOURCES)
    assert FACADE in graph[f"{PACKAGE}"]  # the package re-exports the facade: edges are seen
    assert find_cycle(graph) is None


def test_the_facades_parts_never_import_it() -> None:
    """What the facade delegates to stands on its own: nothing it imports, at any depth,
    imports the facade back (callers above it, like the package, may)."""
    graph = import_graph(SOURCES)
    below, todo = set(), [FACADE]
    while todo:
        for nxt in graph[todo.pop()] - below:
            below.add(nxt)
            todo.append(nxt)
    assert len(below) >= 8  # writer, retrieval, unit_of_work, ... are all found
    assert sorted(m for m in below if FACADE in graph[m]) == []


@pytest.mark.parametrize(
    "module", sorted(m for m in SOURCES if m != FACADE), ids=lambda m: m
)
def test_no_module_reaches_into_the_facade(module: str) -> None:
    privates = _facade_privates()
    assert {"_parts", "_executors", "_write_behind"} <= privates  # the scan sees its state
    _, tree = SOURCES[module]
    reaches = sorted(
        f"line {node.lineno}: .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in privates
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    )
    assert reaches == []
