"""A stream's SSE bytes through a turn's stream stripper: `headroom.turn.sse_strip.SSEStripper`
(shared with the in-process wrapper); the proxy's relay knows it by this name."""

from ..turn.sse_strip import SSEStripper

__all__ = ["SSEStripper"]
