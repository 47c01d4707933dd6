"""`from headroom.memory.ports import MemoryFilter, VectorFilter` as the spec writes it."""

from memory.ports import *  # noqa: F403
from memory.ports import __all__  # noqa: F401
