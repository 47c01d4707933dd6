"""Making untrusted text safe to store, embed and send back: one function, no I/O."""

from __future__ import annotations

import re

__all__ = ["REPLACEMENT", "clean_text"]

REPLACEMENT = "\ufffd"

_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 controls except TAB (\x09) and LF (\x0a); CR goes too, so "\r\n" becomes "\n".
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f]")


def _join_pair(match: re.Match[str]) -> str:
    high, low = (ord(c) for c in match.group())
    return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))


def clean_text(text: str) -> str:
    """`text` made valid for UTF-8 storage, tokenizers and JSON.

    - A high surrogate followed by a low one (UTF-16 halves that reached us apart, e.g. from
      `surrogatepass` decoding) becomes the character they encode.
    - Any other surrogate, U+D800..U+DFFF, becomes U+FFFD. JSON's `"\\ud800"` is valid JSON but
      decodes to such a lone surrogate, which cannot be encoded as UTF-8; surrogates are the only
      code points a Python `str` can hold that UTF-8 cannot encode.
    - NUL and the other C0 controls (U+0000..U+001F) are removed, except TAB and LF. CR is
      removed too, so Windows line ends become LF. DEL and C1 controls are kept: they encode.

    Everything else, whitespace and case included, is left exactly as it was, so cleaning is
    idempotent and text that was already clean is returned unchanged.
    """
    if text.isascii():
        return _CONTROL.sub("", text) if _CONTROL.search(text) else text
    if _SURROGATE.search(text):
        text = _SURROGATE.sub(REPLACEMENT, _PAIR.sub(_join_pair, text))
    return _CONTROL.sub("", text)
