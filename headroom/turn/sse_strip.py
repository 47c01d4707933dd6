"""A streamed answer's SSE bytes through a turn's stream stripper: bytes in, bytes out. I/O-free
(the proxy's `relay.py` and the in-process wrapper's transport do the reading and writing).

`SSEStripper` decodes events (`sse.py`), hands each JSON payload to the format's stripper
(for chat completions `headroom.turn.chat.ChunkRewriter`) and encodes what comes back:

- an event nobody changed goes out as its exact bytes; a changed one keeps its other SSE lines
  (`id:`, `event:`, comments) around the new data;
- events whose data is not JSON, and comments, pass untouched;
- the stream's `data: [DONE]` (chat completions) or the event the format says ends the answer
  (`ends_answer`: Responses' `response.completed`, Messages' `message_stop`), rewritten, and
  everything after it are held (`done`) until `release()`, so the caller can make the memory
  block durable before the client learns the answer is complete;
- an event the stripper adds (held-back text) is written like the event it came with, its
  `event:` line naming the added event's own `type` (Anthropic's SDK reads that line).
"""

from __future__ import annotations

from .format import AnswerStreamStripper
from .jsonio import dumps, loads
from .sse import SSEDecoder, SSEEvent
from .stripper import Block

__all__ = ["SSEStripper"]


class SSEStripper:
    def __init__(self, stripper: AnswerStreamStripper) -> None:
        self.stripper = stripper
        self._decoder = SSEDecoder()
        self._held: list[bytes] | None = None  # from [DONE] on, until released
        self._released = False
        self._last: SSEEvent | None = None  # the template of events added at the end

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
        self._last = event
        items = [event.raw if item is payload else self._encode(item, like=event)
                 for item in self.stripper.feed(payload)]
        if self.stripper.ends_answer(payload):
            # The held text and the rewritten final event wait with it: the answer is complete.
            self._held = items
            return
        out.extend(items)

    def _encode(self, item: object, like: SSEEvent | None = None) -> bytes:
        """`item` as an event: a rewrite of `like` keeps its other lines; an added one (no
        `like`, or another type than `like`'s `event:` line names) carries only its data and,
        in a stream that names its events, an `event:` line with its own type."""
        data = dumps(item).decode()
        kind = item.get("type") if isinstance(item, dict) else None
        template = like or self._last
        named = template is not None and any(line.startswith("event:")
                                             for line in template.lines)
        if like is not None and not (named and f"event: {kind}" not in like.lines):
            return like.with_data(data).raw
        if named and isinstance(kind, str):
            lines = (f"event: {kind}", *(f"data: {part}" for part in data.split("\n")))
            return SSEEvent(b"", lines).with_data(data).raw
        return SSEEvent.from_data(data).raw
