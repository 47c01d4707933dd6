"""Each public package's `__all__` lists exactly its public names (httpx's
tests/test_exported_members.py), and every module's `__all__` names things that exist."""

from __future__ import annotations

import importlib
import pkgutil
import types

import pytest

import headroom
import headroom.memory
import headroom.memory.adapters
import headroom.memory.ports
import headroom.turn

# Packages whose __init__ only re-exports; ordinary modules are checked by the test below.
FACADES = [headroom, headroom.memory, headroom.memory.adapters, headroom.turn]


def public_names(module: types.ModuleType) -> list[str]:
    """What `vars(module)` offers a user: not private, not a submodule."""
    return sorted(
        (
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)
        ),
        key=str.casefold,
    )


@pytest.mark.parametrize("module", FACADES, ids=lambda m: m.__name__)
def test_all_imports_are_exported(module: types.ModuleType) -> None:
    lazy = {"with_memory"} if module is headroom else set()  # resolved on first access
    assert sorted(set(module.__all__) - lazy, key=str.casefold) == public_names(module)
    assert list(module.__all__) == sorted(module.__all__, key=str.casefold)


def test_headroom_with_memory_is_importable() -> None:
    from headroom import with_memory
    from headroom.wrapper import with_memory as defined

    assert with_memory is defined and callable(with_memory)
    with pytest.raises(AttributeError):
        headroom.no_such_name  # noqa: B018


def test_headroom_re_exports_the_engine() -> None:
    for name in set(headroom.__all__) - {"with_memory"}:
        assert getattr(headroom, name) is getattr(headroom.memory, name)


def test_the_spec_imports_work() -> None:
    """Every name the spec imports from the public packages."""
    for name in ("HierarchicalMemory", "MemoryConfig", "MemoryCategory", "EmbedderBackend"):
        assert name in headroom.memory.__all__
    for name in ("MemoryFilter", "VectorFilter"):
        assert name in headroom.memory.ports.__all__
    assert "with_memory" in headroom.__all__


def _modules_with_all() -> list[str]:
    names = []
    for package in ("headroom",):
        pkg = importlib.import_module(package)
        names.append(package)
        names += [info.name for info in pkgutil.walk_packages(pkg.__path__, package + ".")]
    return [n for n in names if hasattr(importlib.import_module(n), "__all__")]


@pytest.mark.parametrize("name", _modules_with_all())
def test_every_listed_name_exists(name: str) -> None:
    module = importlib.import_module(name)
    listed = module.__all__
    assert len(listed) == len(set(listed)), "duplicates in __all__"
    assert [n for n in listed if not hasattr(module, n)] == []
