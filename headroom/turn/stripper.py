"""The `<memory>` block's text state machine: text in any pieces, visible text out. I/O-free and
wire-format-free; every format adapter (chat completions today) runs one `BlockStripper` per
choice, and the non-streaming path runs the same machine, so streaming cannot disagree with it.

What counts as the block (the stripper's rules, in one place):
- A candidate starts at `<memory>`. Its first visible character (after an optional ``` fence
  line) decides how it reads: `{` or `[` make it JSON, anything else makes it prose.
- It ends at the first `</memory>` after it, except that in JSON the tags inside strings do not
  count, so a memory whose text mentions the tag cannot end the block early and leak its tail.
- A closed JSON candidate is a block wherever it stands: text after it (a closing line, a second
  block, one invisible character) is answer text, and the block still leaves the answer. Models
  do write a sentence after the block, or two blocks; showing those leaked the block and lost its
  memories. Several blocks are kept in order, their bodies joined by newlines (`block.parse_ops`
  reads every JSON value in a body).
- A closed prose candidate is the block only if nothing but whitespace follows; otherwise it is
  released as ordinary answer text (an answer that talks about the tag). Another `<memory>`
  (outside JSON strings) inside an unclosed candidate starts a new one and releases the old one.
- An unclosed candidate at the end of the message is stripped as a truncated block when the
  answer was cut off (`cut_off=True`: the model hit its token limit, or the answer ended without
  saying it was complete) or when it is not prose (JSON, a fence, or empty); an unclosed
  `<memory>` in prose that ended normally stays in the answer. With `cut_off`, a dangling partial
  tag (`<mem`) is stripped too.
- Whitespace right before the block is not part of the visible text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["CLOSE_TAG", "OPEN_TAG", "Block", "BlockStripper", "pick_block", "split_block"]

OPEN_TAG = "<memory>"
CLOSE_TAG = "</memory>"

_OUTSIDE, _INSIDE, _AFTER = "outside", "inside", "after"
_UNDECIDED, _JSON, _PROSE = "undecided", "json", "prose"
_NO_FENCE, _FENCE_LINE, _AFTER_FENCE = 0, 1, 2


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of OPEN_TAG."""
    for n in range(min(len(OPEN_TAG) - 1, len(text)), 0, -1):
        if text.endswith(OPEN_TAG[:n]):
            return n
    return 0


def _split_trailing_space(text: str) -> tuple[str, str]:
    kept = text.rstrip()
    return kept, text[len(kept) :]


class BlockStripper:
    """Text deltas of one choice in; visible text out. See the module docstring for the rules.

    For any text and any split of it into deltas, `"".join(feed(d) for d in deltas) + finish()`
    is the same string, and `block`/`truncated` are the same.
    """

    def __init__(self) -> None:
        self.block: str | None = None
        self.truncated = False
        self.finished = False
        self._state = _OUTSIDE
        self._pending = ""  # OUTSIDE: trailing whitespace and a possible start of OPEN_TAG
        self._lead = ""  # whitespace before the candidate's opening tag
        self._body: list[str] = []  # after the opening tag (closing tag included once seen)
        self._trail = ""  # AFTER: whitespace after the closing tag
        self._found: list[str] = []  # bodies of JSON blocks that text followed
        self._new_candidate()

    def _new_candidate(self) -> None:
        # How the body reads is decided by its first visible character: "{" or "[" (a ``` fence
        # line may come first) makes it JSON, whose strings may hold tags; anything else is
        # prose, where the first closing tag ends it and any opening tag starts over.
        self._mode, self._fence = _UNDECIDED, _NO_FENCE
        self._in_str = self._escaped = False

    @property
    def in_block(self) -> bool:
        """True between an opening tag and its closing tag: the model may be writing a memory
        right now, and the rest of it has not arrived."""
        return not self.finished and self._state == _INSIDE

    def feed(self, text: str) -> str:
        if self.finished:
            raise RuntimeError("BlockStripper.feed() after finish()")
        out: list[str] = []
        while text:
            if self._state == _OUTSIDE:
                emitted, text = self._outside(text)
            elif self._state == _INSIDE:
                emitted, text = self._inside(text)
            else:
                emitted, text = self._after(text)
            out.append(emitted)
        return "".join(out)

    def finish(self, *, cut_off: bool = False) -> str:
        """The rest of the visible text. `cut_off`: the answer did not end normally."""
        if self.finished:
            return ""
        self.finished = True
        out = ""
        if self._state == _OUTSIDE:
            if cut_off and _partial_tag(self._pending):
                self.block, self.truncated = "", True
            else:
                out = self._pending
        elif self._state == _INSIDE:
            body = "".join(self._body)
            if cut_off or self._mode != _PROSE:
                self.block, self.truncated = body, True
            else:
                out = self._lead + OPEN_TAG + body
        else:
            self.block = "".join(self._body)[: -len(CLOSE_TAG)]
        if self._found:
            last = [self.block] if self.block is not None else []
            self.block = "\n".join([*self._found, *last])
        self._pending, self._body = "", []
        return out

    def _outside(self, text: str) -> tuple[str, str]:
        buf = self._pending + text
        at = buf.find(OPEN_TAG)
        if at >= 0:
            emitted, self._lead = _split_trailing_space(buf[:at])
            self._pending, self._body, self._state = "", [], _INSIDE
            self._new_candidate()
            return emitted, buf[at + len(OPEN_TAG) :]
        partial = _partial_tag(buf)
        emitted, space = _split_trailing_space(buf[: len(buf) - partial])
        self._pending = space + buf[len(buf) - partial :]
        return emitted, ""

    def _inside(self, text: str) -> tuple[str, str]:
        body = self._body
        for i, ch in enumerate(text):
            body.append(ch)
            if self._in_str:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_str = False
                continue
            if self._mode == _UNDECIDED:
                self._decide(ch)  # never on ">", so the tag check below cannot be skipped
            elif self._mode == _JSON and ch == '"':
                self._in_str = True
                continue
            if ch == ">":
                tail = "".join(body[-len(CLOSE_TAG) :])
                if tail == CLOSE_TAG:
                    self._state, self._trail = _AFTER, ""
                    return "", text[i + 1 :]
                if tail.endswith(OPEN_TAG):
                    # A new opening tag outside any string: the old candidate was answer text.
                    released = self._lead + OPEN_TAG + "".join(body[: -len(OPEN_TAG)])
                    emitted, self._lead = _split_trailing_space(released)
                    self._body = []
                    self._new_candidate()
                    return emitted, text[i + 1 :]
        return "", ""

    def _decide(self, ch: str) -> None:
        if ch in "{[":
            self._mode = _JSON
        elif ch == "\n" and self._fence == _FENCE_LINE:
            self._fence = _AFTER_FENCE
        elif ch.isspace():
            pass
        elif self._fence == _AFTER_FENCE or not (ch == "`" or (ch.isalnum() and self._fence)):
            self._mode = _PROSE
        else:
            self._fence = _FENCE_LINE  # backticks, then a language name like "json"

    def _after(self, text: str) -> tuple[str, str]:
        for i, ch in enumerate(text):
            if not ch.isspace():
                if self._mode == _JSON:
                    # A block with answer text after it: it leaves, and one run of the
                    # whitespace around it stays between the text before and after.
                    self._found.append("".join(self._body)[: -len(CLOSE_TAG)])
                    self._pending = self._lead or self._trail
                    self._body, self._state = [], _OUTSIDE
                    return "", text[i:]
                # Text after a prose candidate: it was part of the answer.
                emitted = self._lead + OPEN_TAG + "".join(self._body)
                self._pending, self._body, self._state = self._trail, [], _OUTSIDE
                return emitted, text[i:]
            self._trail += ch
        return "", ""


@dataclass(frozen=True)
class Block:
    """The block(s) one choice (or answer) wrote: the body, and whether the last was cut off."""

    choice: int
    body: str
    truncated: bool


def pick_block(blocks: Mapping[int, Block]) -> Block | None:
    """The block to store: choice 0's, else the lowest-numbered choice that wrote one."""
    return blocks[min(blocks)] if blocks else None


def split_block(text: str, *, cut_off: bool = False) -> tuple[str, str | None, bool]:
    """(visible text, block body or None, truncated) for a whole answer."""
    stripper = BlockStripper()
    visible = stripper.feed(text) + stripper.finish(cut_off=cut_off)
    return visible, stripper.block, stripper.truncated
