"""agent.core.tty: what agentctl shows of text it does not control."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.core.tty import escape, escape_bytes, unescape

# What must never reach a terminal raw: every control (C0, DEL, C1), format character
# (bidi embeddings, overrides and isolates, zero-width characters, BOM, tags), line and
# paragraph separators, surrogates, private-use and unassigned code points.  Decided here
# by category, independently of the module's own rule.
_UNSAFE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def unsafe(text: str, *, tab_ok: bool = False) -> list[str]:
    return [c for c in text if unicodedata.category(c) in _UNSAFE and not (tab_ok and c == "\t")]


@settings(deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=())))  # surrogates too
@example("\x1b]0;title\x07\x1b]52;c;cHduZWQ=\x07\x1b[2A\x1b[2K\rfake\u202eevil\x9b1m")
@example("\ud800\udc80\udcff\U000e0041\u2028\u2029\ufeff\x85\x00\x7f")
def test_escape_leaves_nothing_that_drives_a_terminal(text: str) -> None:
    out = escape(text)
    assert unsafe(out) == []
    assert "\x1b" not in out and not set(BIDI) & set(out)
    assert unescape(out) == text  # unambiguous: the original comes back
    kept = escape(text, keep_tab=True)
    assert unsafe(kept, tab_ok=True) == [] and unescape(kept) == text


@settings(deadline=None)
@given(st.binary())
@example(b"ok \xff\xfe \xc3\x28 \xed\xa0\x80 \xe2\x80\xae \x1b[31m")
def test_escape_bytes_shows_invalid_utf8_as_byte_escapes(data: bytes) -> None:
    out = escape_bytes(data)
    assert unsafe(out) == []
    assert unescape(out).encode("utf-8", "surrogateescape") == data


@settings(deadline=None)
@given(st.text(alphabet=st.characters(categories=["L", "M", "N", "P", "S", "Zs"],
                                      exclude_characters="\\")))
def test_printable_text_passes_unchanged(text: str) -> None:
    assert escape(text) == text


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain ASCII line", "plain ASCII line"),
    ("Grüße, Ελληνικά, русский, 日本語, עברית, العربية", "Grüße, Ελληνικά, русский, 日本語, "
     "עברית, العربية"),
    ("\u00a0nbsp and\u3000ideographic space", "\u00a0nbsp and\u3000ideographic space"),
    ("back\\slash", "back\\\\slash"),
    ("a\\x1b is not ESC", "a\\\\x1b is not ESC"),
    ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),
    ("\x1b]52;c;ZWNobyBwd25lZA==\x07", "\\x1b]52;c;ZWNobyBwd25lZA==\\x07"),
    ("\x1b[1A\x1b[2Kok", "\\x1b[1A\\x1b[2Kok"),
    ("line\rfake line", "line\\rfake line"),
    ("one\ntwo\tcol", "one\\ntwo\\tcol"),
    ("\x00\x7f", "\\x00\\x7f"),
    ("\x9b31m C1 CSI \x85 NEL", "\\u009b31m C1 CSI \\u0085 NEL"),
    ("access = \u202e \u2066denied\u2069 \u2066 // check", "access = \\u202e \\u2066denied"
     "\\u2069 \\u2066 // check"),
    ("zero\u200bwidth\u200d\ufeff", "zero\\u200bwidth\\u200d\\ufeff"),
    ("\u2028line sep\u2029", "\\u2028line sep\\u2029"),
    ("tag \U000e0041", "tag \\U000e0041"),
    ("\udcff kept byte, \ud800 lone surrogate", "\\xff kept byte, \\ud800 lone surrogate"),
])
def test_escape_table(raw: str, shown: str) -> None:
    assert escape(raw) == shown
    assert unescape(shown) == raw


def test_keep_tab_and_escape_bytes() -> None:
    assert escape("a\tb", keep_tab=True) == "a\tb"
    assert escape("a\tb\r", keep_tab=True) == "a\tb\\r"
    assert escape_bytes(b"caf\xc3\xa9 \xff\xfe \xe2\x80\xae") == "café \\xff\\xfe \\u202e"
    assert escape_bytes(b"\xc3") == "\\xc3"  # a cut UTF-8 sequence


@pytest.mark.parametrize("bad", ["\\", "tail\\", "\\q", "\\x1", "\\xZZ", "\\u12", "\\UFFFFFFFF",
                                 "\\U00110000"])
def test_unescape_refuses_what_escape_never_writes(bad: str) -> None:
    with pytest.raises(ValueError):
        unescape(bad)
