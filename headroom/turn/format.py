"""The seam between a turn and a wire format: what an API adapter (chat completions today; the
Responses API or Anthropic's Messages beside it) tells the turn about its requests and answers.

An adapter works on decoded JSON (dicts), never on bytes or sockets: the HTTP proxy decodes and
encodes around it, the in-process wrapper converts SDK objects to dicts and back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..memory.models import Memory
from .stripper import Block

__all__ = ["AnswerStreamStripper", "Injected", "WireFormat"]


@dataclass(frozen=True)
class Injected:
    body: dict[str, Any]  # the request to send upstream
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> memory id (block parser)
    count: int = 0  # memories shown


class AnswerStreamStripper(Protocol):
    """A streamed answer's events (decoded JSON) in, the events the client may see out."""

    @property
    def chosen_block(self) -> Block | None: ...

    @property
    def in_block(self) -> bool:
        """True while the answer may be in the middle of writing its block."""
        ...

    def feed(self, event: Any) -> list[Any]:
        """The events to send for `event`; the input object itself when it is unchanged."""
        ...

    def finish(self) -> list[Any]:
        """At the end of the stream: what was held back and is not the block."""
        ...

    def ends_answer(self, event: Any) -> bool:
        """True for the event that says the answer is complete (Responses' `response.completed`,
        Messages' `message_stop`): the transport holds it, and what follows, until the block is
        stored. Chat completions ends with `[DONE]`, which is not JSON: always False there."""
        ...


class WireFormat(Protocol):
    name: str

    def user(self, body: Mapping[str, Any]) -> Any:
        """The body's own user id field (`user`, or Messages' `metadata.user_id`), or None."""
        ...

    def has_conversation(self, body: Mapping[str, Any]) -> bool:
        """False when the request has nothing a turn can work with (it passes unchanged)."""
        ...

    def streams(self, body: Mapping[str, Any]) -> bool: ...

    def query_text(self, body: Mapping[str, Any]) -> str:
        """What recall searches with: the latest user input's text."""
        ...

    def extraction_blockers(self, body: Mapping[str, Any]) -> list[str]:
        """Why a block must not be asked for in this request (a note each); [] when it may."""
        ...

    def inject(
        self, body: Mapping[str, Any], memories: Sequence[Memory], *, extraction: bool,
        budget_tokens: int,
    ) -> Injected: ...

    def strip_answer(self, answer: Any) -> tuple[Any, Block | None]:
        """A non-streamed answer without its block (a copy), and the block to store."""
        ...

    def stream_stripper(self) -> AnswerStreamStripper: ...
