"""One turn with memory, written once for every transport and wire format:
prepare (recall → inject) → the caller asks the model → strip → store.

The HTTP proxy and the in-process wrapper both drive a `Turn`; a `WireFormat` adapter knows where
the format keeps its conversation and its answer text. Every memory step fails open: the caller
always gets the model's answer, and `receipt()` says what memory did.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..memory.models import Memory, Scope
from .block import parse_ops
from .format import AnswerStreamStripper, WireFormat
from .inject import cap_query
from .service import MemoryService, RecallSettings
from .stripper import Block

log = logging.getLogger(__name__)

__all__ = ["BLOCK_HEADER", "Turn"]

# The receipt of what came back for memory (`Turn.block_outcome`): stored (a block came back and
# its ops were queued), none (the model wrote no block), truncated (the block was cut off; what
# could be read was queued), invalid (a block came back but nothing in it could be read). Two
# more values say no outcome is known: off (no block was asked for) and pending (a stream: its
# headers leave before the answer; the outcome is logged and counted in /readyz).
BLOCK_HEADER = "x-headroom-memory-block"


class Turn:
    """`scope=None` (no user) or neither `recall` nor `extract`: the turn does nothing and the
    request goes upstream as it came."""

    def __init__(
        self, fmt: WireFormat, service: MemoryService, scope: Scope | None, *, request_id: str,
        recall: bool = True, extract: bool = True, settings: RecallSettings | None = None,
        durable_wait_s: float = 1.0,
    ) -> None:
        self.format = fmt
        self.service = service
        self.scope = scope
        self.request_id = request_id
        self.recall = recall
        self.extract = extract
        self.settings = settings or service.settings
        self.durable_wait_s = durable_wait_s
        self.extraction = False  # a block was asked for (decided by prepare)
        self.aliases: dict[str, str] = {}
        self.injected = 0
        self.overhead_ms = 0.0
        self.notes: list[str] = []
        self.stored: bool | None = None  # None: nothing to store; else durable before answering
        self.block_outcome: str | None = None  # set by store(): stored|none|truncated|invalid

    @property
    def active(self) -> bool:
        return self.scope is not None and (self.recall or self.extract)

    async def prepare(self, body: dict[str, Any]) -> dict[str, Any]:
        """The request to send upstream: recalled memories and the extraction instruction
        injected. Unchanged when the turn is inactive or the request has no conversation."""
        started = time.perf_counter()
        if self.scope is None or not self.active or not self.format.has_conversation(body):
            return body
        if self.service.engine is None:
            # No database: nothing could be recalled or stored, so ask the model for no block.
            self.notes.append("memory off: database unavailable")
            return body
        blockers = self.format.extraction_blockers(body) if self.extract else []
        self.notes.extend(blockers)
        extraction = self.extract and not blockers
        memories: list[Memory] = []
        if self.recall:
            query = cap_query(self.format.query_text(body))
            memories = await self.service.recall(self.scope, query, self.settings)
            if not self.service.ready:
                self.notes.append("recall off: memory not ready")
        injected = self.format.inject(
            body, memories, extraction=extraction, budget_tokens=self.settings.token_budget
        )
        self.extraction = extraction
        self.aliases = injected.aliases
        self.injected = injected.count
        self.overhead_ms = (time.perf_counter() - started) * 1000
        return injected.body

    def strip_answer(self, answer: Any) -> tuple[Any, Block | None]:
        """A whole answer without its block (a copy), and the block."""
        return self.format.strip_answer(answer)

    def stream_stripper(self) -> AnswerStreamStripper:
        return self.format.stream_stripper()

    async def store(self, block: Block | None) -> None:
        """Parse the block and queue its ops durably, waiting at most `durable_wait_s` for the
        outbox commit (then they stay queued in memory). Never raises."""
        if not self.extraction or self.scope is None or self.block_outcome is not None:
            return
        if block is None:
            self._outcome("none")
            return
        try:
            parsed = parse_ops(block.body, truncated=block.truncated, aliases=self.aliases)
        except Exception:  # the parser is tolerant; this guards the fail-open promise regardless
            log.exception("could not parse the memory block of %s", self.request_id)
            self._outcome("invalid")
            return
        for warning in parsed.warnings:
            log.info("memory block of %s: %s", self.request_id, warning)
        if block.truncated:
            self._outcome("truncated")
        elif not parsed.ops and parsed.warnings:
            self._outcome("invalid")
        else:
            self._outcome("stored")
        if not parsed.ops:
            return
        try:
            self.stored = await self.service.store(
                parsed.ops, self.scope, self.request_id, wait_s=self.durable_wait_s
            )
        except Exception:  # store never raises by contract; fail open regardless
            log.exception("could not queue the memory ops of %s", self.request_id)
            self.stored = False

    def _outcome(self, outcome: str) -> None:
        self.block_outcome = outcome
        # Per outcome in /readyz: an operator sees when a model does not follow the instruction.
        self.service.counters[f"memory_block_{outcome}"] += 1
        # A stream's receipt said `pending`: its outcome is in the log, by request id.
        level = logging.INFO if outcome in ("truncated", "invalid") else logging.DEBUG
        log.log(level, "memory block of %s: %s", self.request_id, outcome)

    def receipt(self, overhead_ms: float | None = None) -> dict[str, str]:
        """The receipt headers: what memory did for this request. Before `store()` ran (a
        stream's headers), the block header says `pending`.

        `overhead_ms`: the caller's measure of all it added to the request (the HTTP proxy
        counts from the request's arrival, see `proxy/timing.py`); without it, the time
        `prepare` took."""
        overhead = self.overhead_ms if overhead_ms is None else overhead_ms
        headers = {
            "x-headroom-request-id": self.request_id,
            "x-headroom-memories-injected": str(self.injected),
            "x-headroom-memory-overhead-ms": f"{overhead:.1f}",
        }
        if self.active:
            headers[BLOCK_HEADER] = (
                (self.block_outcome or "pending") if self.extraction else "off"
            )
        if self.notes:
            headers["x-headroom-memory-notes"] = "; ".join(self.notes)
        return headers
