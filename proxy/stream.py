"""A streamed answer's SSE bytes through a turn's stream stripper: bytes in, bytes out. I/O-free
(`proxy/relay.py` does the reading and writing).

`SSEStripper` decodes events (`proxy/sse.py`), hands each JSON payload to the format's stripper
(for chat completions `headroom.turn.chat.ChunkRewriter`) and encodes what comes back:

- an event nobody changed goes out as its exact bytes; a changed one keeps its other SSE lines
  (`id:`, `event:`, comments) around the new data;
- events whose data is not JSON, and comments, pass untouched;
- the stream's `data: [DONE]` and everything after it are held (`done`) until `release()`, so the
  caller can make the memory block durable before the client learns the answer is complete.
"""

from __future__ import annotations

from ..turn.format import AnswerStreamStripper
from ..turn.stripper import Block
from .jsonio import dumps, loads
from .sse import SSEDecoder, SSEEvent

__all__ = ["SSEStripper"]


class SSEStripper:
    def __init__(self, stripper: AnswerStreamStripper) -> None:
        self.stripper = stripper
        self._decoder = SSEDecoder()
        self._held: list[bytes] | None = None  # from [DONE] on, until released
        self._released = False

    @property
    def done(self) -> bool:
        """`[DONE]` arrived: the answer is complete, its block final, the rest held."""
        return self._held is not None or self._released

    @property
    def chosen_block(self) -> Block | None:
        return self.stripper.chosen_block

    @property
    def in_block(self) -> bool:
        return self.stripper.in_block

    def feed(self, chunk: bytes) -> bytes:
        """What the client may get now (nothing from `[DONE]` on: see `release`)."""
        out: list[bytes] = []
        for event in self._decoder.feed(chunk):
            self._route(event, out)
        return b"".join(out)

    def finish(self) -> bytes:
        """At the end of the upstream's stream: an unterminated last event, then the text held
        back by choices that never finished. Idempotent."""
        out: list[bytes] = []
        for event in self._decoder.flush():
            self._route(event, out)
        if not self.done:
            out.extend(self._encode(item) for item in self.stripper.finish())
        return b"".join(out)

    def release(self) -> bytes:
        """The held `[DONE]` and whatever followed it; later events then pass through too."""
        held, self._held = self._held or [], None
        self._released = True
        return b"".join(held)

    def _route(self, event: SSEEvent, out: list[bytes]) -> None:
        if self._held is not None:
            self._held.append(event.raw)
            return
        if self._released:
            out.append(event.raw)
            return
        data = event.data
        if data is None:
            out.append(event.raw)
            return
        if data.strip() == "[DONE]":
            out.extend(self._encode(item) for item in self.stripper.finish())
            self._held = [event.raw]
            return
        try:
            payload = loads(data)
        except ValueError:
            out.append(event.raw)
            return
        for item in self.stripper.feed(payload):
            out.append(event.raw if item is payload else self._encode(item, like=event))

    @staticmethod
    def _encode(item: object, like: SSEEvent | None = None) -> bytes:
        data = dumps(item).decode()
        return (like.with_data(data) if like is not None else SSEEvent.from_data(data)).raw
