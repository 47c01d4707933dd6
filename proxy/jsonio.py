"""JSON on the hot path lives in `headroom.turn.jsonio` (shared with the in-process wrapper);
the proxy's modules know it by this name as well."""

from ..turn.jsonio import dumps, loads

__all__ = ["dumps", "loads"]
