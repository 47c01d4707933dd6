"""`from headroom.memory import HierarchicalMemory, MemoryConfig, ...` as the spec writes it."""

from memory import *  # noqa: F403
from memory import __all__  # noqa: F401
