"""A streamed answer from the upstream to the client, minus the memory block.

A reader task owns the upstream response: it reads, strips (`proxy/stream.py`) and hands bytes
to the client's response through a small queue, so the client going away (its task cancelled by
starlette) never cancels a read half-way. Then:

- if no memory block is being written, the reader stops at once and closes the upstream (a paid
  generation nobody will read);
- if one is (its opening tag arrived, its closing tag not yet), the reader goes on to the block's
  end, for at most `BLOCK_TAIL_S`, stores it, and closes the upstream.

Before the client gets the stream's `[DONE]` (or, with no `[DONE]`, its last bytes), the block's
ops are committed to the outbox (`Turn.store`, a bounded wait), so an answer the client fully
received is never lost to a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import anyio
import httpx

from ..turn.turn import Turn
from .errors import error_body
from .jsonio import dumps
from .stream import SSEStripper
from .upstream import Upstream

log = logging.getLogger(__name__)

__all__ = ["BLOCK_TAIL_S", "readers_finished", "relay_stream"]

BLOCK_TAIL_S = 3.0
_QUEUE_CHUNKS = 16  # a slow client slows the upstream read down instead of filling memory


# The event loop keeps only weak references to tasks; a reader outliving its client needs one.
_readers: set[asyncio.Task[None]] = set()


async def readers_finished(timeout: float = BLOCK_TAIL_S + 1) -> bool:
    """Wait for readers still storing a block after their client left; False if some did not end.

    The client's request is over by then, so nothing else waits on them: shutdown must, or the
    block the reader was finishing would be cut off with the event loop.
    """
    running = {task for task in _readers if task.get_loop() is asyncio.get_running_loop()}
    if not running:
        return True
    _, late = await asyncio.wait(running, timeout=timeout)
    if late:
        log.warning("%d stream reader(s) still running after %.0fs; their blocks may be cut off",
                    len(late), timeout)
    return not late


async def relay_stream(response: httpx.Response, turn: Turn) -> AsyncIterator[bytes]:
    """The client's body: the upstream's stream, stripped, its block stored."""
    reader = _Reader(response, turn)
    task = asyncio.get_running_loop().create_task(reader.run(), name="headroom-relay")
    _readers.add(task)
    task.add_done_callback(_readers.discard)
    complete = False
    try:
        while (piece := await reader.queue.get()) is not None:
            yield piece
        complete = True
    finally:
        if not complete:
            reader.client_left(task)


class _Reader:
    def __init__(self, response: httpx.Response, turn: Turn) -> None:
        self.response = response
        self.turn = turn
        self.sse = SSEStripper(turn.stream_stripper())
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUE_CHUNKS)
        self.gone = False
        self.stored = False

    def client_left(self, task: asyncio.Task[None]) -> None:
        self.gone = True
        while not self.queue.empty():  # unblock a reader waiting to hand over a piece
            self.queue.get_nowait()
        if self.sse.in_block:
            log.info("client left %s while the model wrote its memory block; reading on to its "
                     "end (at most %.0fs)", self.turn.request_id, BLOCK_TAIL_S)
            asyncio.get_running_loop().call_later(BLOCK_TAIL_S, task.cancel)
        else:
            log.info("client left %s; closing the upstream stream", self.turn.request_id)
            task.cancel()

    async def run(self) -> None:
        try:
            await self._relay()
        except asyncio.CancelledError:
            pass  # the client left (or the block's tail took too long): store what arrived
        finally:
            with anyio.CancelScope(shield=True):
                # Store before closing: once the upstream is closed, the ops are already in the
                # outbox (or queued), so nothing that waits on the upstream can miss them.
                if not self.stored:
                    self.sse.finish()  # a block complete before its finish chunk still counts
                    await self._store()
                await Upstream.close_response(self.response)
                await self._put(None)

    async def _relay(self) -> None:
        try:
            async for chunk in self.response.aiter_bytes():
                await self._put(self.sse.feed(chunk))
                if self.sse.done and not self.stored:
                    await self._store()
                    await self._put(self.sse.release())
                if self.gone and not self.sse.in_block:
                    return
        except httpx.HTTPError as exc:
            log.warning("upstream stream of %s failed mid-way: %s", self.turn.request_id, exc)
            error = error_body(
                f"the upstream stream broke off: {exc}", "upstream_error", "upstream_stream_error"
            )
            tail = self.sse.finish()
            await self._store()
            await self._put(tail + b"data: " + dumps(error) + b"\n\n")
            return
        tail = self.sse.finish()
        if not self.stored:
            await self._store()
        await self._put(tail + self.sse.release())

    async def _store(self) -> None:
        self.stored = True
        await self.turn.store(self.sse.chosen_block)

    async def _put(self, piece: bytes | None) -> None:
        if self.gone or piece == b"":
            return
        await self.queue.put(piece)
