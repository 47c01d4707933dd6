"""Headroom Memory's public API: `from headroom import with_memory`.

Installed, everything lives under this one name: `headroom.memory` (the engine, the repository's
`memory/`), `headroom.proxy` (the HTTP proxy, `proxy/`) and `headroom.cli` (`cli.py`).
"""

from .memory import (
    EmbedderBackend,
    HierarchicalMemory,
    Memory,
    MemoryCategory,
    MemoryConfig,
    MemoryFilter,
)

__all__ = [
    "EmbedderBackend",
    "HierarchicalMemory",
    "Memory",
    "MemoryCategory",
    "MemoryConfig",
    "MemoryFilter",
    "with_memory",
]


def __getattr__(name: str) -> object:
    # with_memory starts nothing, but it imports the turn core: only when asked for.
    if name == "with_memory":
        from .wrapper import with_memory

        return with_memory
    raise AttributeError(name)
