"""clean_text: untrusted text becomes valid UTF-8 without control characters (issue 9, item 1)."""

from __future__ import annotations

import json

from hypothesis import example, given
from hypothesis import strategies as st

from headroom.memory.text import REPLACEMENT, clean_text


def test_a_lone_surrogate_from_json_becomes_the_replacement_character() -> None:
    # Issue 9: this block's text put a row in the outbox that no tokenizer could take.
    text = json.loads('{"add": ["poison \\ud800 tok"]}')["add"][0]
    cleaned = clean_text(text)
    assert cleaned == f"poison {REPLACEMENT} tok"
    assert cleaned.encode("utf-8")


def test_a_low_surrogate_alone_and_a_reversed_pair_are_replaced() -> None:
    assert clean_text("a\udc00b") == f"a{REPLACEMENT}b"
    assert clean_text("\udc00\ud800") == REPLACEMENT * 2


def test_a_split_surrogate_pair_is_joined_into_its_character() -> None:
    halves = "😀".encode("utf-16-le").decode("utf-16-le", "surrogatepass")
    split = "smile " + "".join(chr(c) for c in (0xD83D, 0xDE00))
    assert halves == "😀"  # Python joins a real pair itself; only a hand-split one reaches us
    assert clean_text(split) == "smile 😀"


def test_nul_and_c0_controls_go_but_tab_and_newline_stay() -> None:
    assert clean_text("a\x00b\x07c\x1bd") == "abcd"
    assert clean_text("line one\r\nline\ttwo\n") == "line one\nline\ttwo\n"
    assert clean_text("caf\u00e9\x00 \u4e2d\x1f") == "caf\u00e9 \u4e2d"


def test_clean_text_is_returned_unchanged() -> None:
    for text in ("", "Works at Acme.", "  spaced  ", "Zürich 東京 🚀", "del \x7f and c1 \x85"):
        assert clean_text(text) == text


# Hypothesis leaves surrogates out of text by default; draw them (and controls) on purpose.
_HOSTILE = st.one_of(
    st.characters(),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    st.characters(max_codepoint=0x1F),
)


@given(st.text(alphabet=_HOSTILE, max_size=60))
@example("\ud800")
@example("\x00\ud83d\ude00\r")
def test_any_text_comes_out_encodable_control_free_and_stable(text: str) -> None:
    cleaned = clean_text(text)
    cleaned.encode("utf-8")  # raises on any code point UTF-8 cannot encode
    assert not any(ord(c) < 0x20 and c not in "\t\n" for c in cleaned)
    assert clean_text(cleaned) == cleaned
    assert len(cleaned) <= len(text)
