"""One turn with memory, free of any transport: recall → inject → (the model answers) → strip →
store. The HTTP proxy (`headroom.proxy`) and the in-process wrapper (`headroom.wrapper`) both run
it; a wire-format adapter (`chat.py`: chat completions) maps its requests and answers onto it.

    stripper.py  the `<memory>` block's text state machine (feed/finish), format-free
    block.py     the block's JSON parsed into MemoryOps, tolerantly
    inject.py    the instruction, the memory message and its aliases, the query text
    format.py    the WireFormat protocol an API adapter implements
    chat.py      the chat completions adapter over plain dicts
    responses.py the Responses API adapter (`POST /v1/responses`)
    anthropic.py Anthropic's Messages adapter (`POST /v1/messages`)
    service.py   MemoryService, the engine's fail-open face, and RecallSettings
    turn.py      Turn: prepare, strip, store, receipt
    runtime.py   a background event loop owning one MemoryService per database (in-process)
"""

from .anthropic import Messages, MessagesStreamStripper, strip_message
from .block import ParsedBlock, parse_ops
from .chat import CHAT_COMPLETIONS, ChatCompletions, ChunkRewriter, strip_completion
from .format import AnswerStreamStripper, Injected, WireFormat
from .responses import Responses, ResponsesStreamStripper, strip_response
from .service import MemoryService, RecallSettings
from .stripper import Block, BlockStripper, pick_block, split_block
from .turn import BLOCK_HEADER, Turn

# Sorted case-insensitively, as tests/test_exported_members.py checks every facade.
__all__ = [  # noqa: RUF022
    "AnswerStreamStripper",
    "Block",
    "BLOCK_HEADER",
    "BlockStripper",
    "CHAT_COMPLETIONS",
    "ChatCompletions",
    "ChunkRewriter",
    "Injected",
    "MemoryService",
    "Messages",
    "MessagesStreamStripper",
    "parse_ops",
    "ParsedBlock",
    "pick_block",
    "RecallSettings",
    "Responses",
    "ResponsesStreamStripper",
    "split_block",
    "strip_completion",
    "strip_message",
    "strip_response",
    "Turn",
    "WireFormat",
]
