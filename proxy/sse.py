"""The SSE reader lives in `headroom.turn.sse` (the in-process wrapper reads streams too, without
the web stack); the proxy's modules and tests know it by this name as well."""

from ..turn.sse import SSEDecoder, SSEEvent

__all__ = ["SSEDecoder", "SSEEvent"]
