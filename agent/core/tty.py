"""Terminal-safe text: how agentctl shows what a cell, a manifest or a reply controls (pure).

A cell's output, a process name, a path or a manifest's arguments reach the operator's
terminal through agentctl, often a serial console.  Printed raw, their control characters
drive that terminal: ESC sequences move the cursor and rewrite earlier lines, set the
window title (OSC 0), write the clipboard (OSC 52) or answer back; a carriage return or a
bidi override makes a line show something other than what it holds; C1 controls (U+009B
is CSI) do the same on terminals that honour them.  :func:`escape` turns each such
character into a visible escape, as journalctl and systemd do (``\\x1b``, ``\\u202e``):

=========================================================== ===========================
character                                                   shown as
=========================================================== ===========================
backslash                                                   ``\\\\``
newline, carriage return, tab (a tab may be kept)           ``\\n``, ``\\r``, ``\\t``
other C0 controls, DEL                                      ``\\x1b``, ``\\x7f``
a byte that is not UTF-8 (bytes decoded with                ``\\xff``
``surrogateescape``, see :func:`escape_bytes`)
C1 controls, format characters (bidi controls and           ``\\u0085``, ``\\u202e``,
isolates, zero-width characters, BOM, tags), line and       ``\\U000e0041``
paragraph separators, other surrogates, private-use and
unassigned code points
=========================================================== ===========================

Everything else passes unchanged: printable ASCII, letters, digits, marks and symbols of
every script, and spaces.  Every backslash in the output starts an escape, so the
mapping is unambiguous and :func:`unescape` inverts it.

JSON output (``--json``) is safe as it is when it is pure ASCII: :func:`json_text` makes
sure of that (``ensure_ascii``: every control, every non-ASCII character as ``\\uXXXX``)
and shows bytes as arrays of byte values, as ``journalctl -o json`` does.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from typing import Any

__all__ = ["escape", "escape_bytes", "json_text", "unescape"]

_PLAIN = re.compile(r"[\x20-\x5b\x5d-\x7e]*")  # printable ASCII but the backslash
_SPECIAL = re.compile(r"[^\x20-\x5b\x5d-\x7e]")
_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNNAMED = {v[1]: k for k, v in _NAMED.items()}
_ESCAPE = re.compile(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8})|(.)|\Z)", re.S)


@functools.lru_cache(maxsize=4096)
def _shown(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    cp = ord(ch)
    if cp < 0x80:  # C0 controls and DEL (printable ASCII never gets here)
        return f"\\x{cp:02x}"
    if 0xDC80 <= cp <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape
        return f"\\x{cp - 0xDC00:02x}"
    # isprintable() is False for Cc, Cf, Cs, Co, Cn, Zl, Zp and the Zs spaces but U+0020.
    if ch.isprintable() or unicodedata.category(ch) == "Zs":
        return ch
    return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


def escape(text: str, *, keep_tab: bool = False) -> str:
    """``text`` with every character that could drive a terminal shown as an escape (see
    the module's table).  ``keep_tab`` leaves tabs as they are (log lines: a tab only
    moves to the next tab stop); a newline is always escaped, so one line stays one."""
    if _PLAIN.fullmatch(text):
        return text

    def one(m: re.Match[str]) -> str:
        ch = m.group()
        return ch if keep_tab and ch == "\t" else _shown(ch)

    return _SPECIAL.sub(one, text)


def escape_bytes(data: bytes, *, keep_tab: bool = False) -> str:
    """Bytes as written (a cell's output line): UTF-8 text shown as :func:`escape` shows it,
    each byte that is not part of valid UTF-8 as ``\\xNN``."""
    return escape(data.decode("utf-8", "surrogateescape"), keep_tab=keep_tab)


def unescape(text: str) -> str:
    """The inverse of :func:`escape`: ``unescape(escape(s)) == s`` for every string (a
    byte escape ``\\xNN`` of 0x80 and above comes back as its ``surrogateescape`` code
    point, so ``.encode("utf-8", "surrogateescape")`` gives the original bytes).  Raises
    ValueError on a backslash that does not start one of :func:`escape`'s escapes."""

    def one(m: re.Match[str]) -> str:
        byte, short, long_, other = m.groups()
        if byte is not None:
            n = int(byte, 16)
            return chr(n if n < 0x80 else 0xDC00 + n)
        if short is not None or long_ is not None:
            cp = int(short or long_, 16)
            if cp > 0x10FFFF:
                raise ValueError(f"escape \\U{long_} is beyond Unicode")
            return chr(cp)
        if other is not None and other in _UNNAMED:
            return _UNNAMED[other]
        raise ValueError(f"bad escape at {m.group()!r}")

    return _ESCAPE.sub(one, text)


def _jsonable(obj: Any) -> Any:
    """What json can write: bytes as byte values, sets as arrays, bytes keys as escaped
    text (a CBOR map may have them, a JSON object may not)."""
    if isinstance(obj, dict):
        return {escape_bytes(k) if isinstance(k, bytes) else k: _jsonable(v)
                for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bytes | bytearray):
        return list(obj)
    return obj


def json_text(obj: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """``obj`` as JSON in printable ASCII only (a newline between items with ``indent``):
    safe on a terminal whatever its strings hold.  Bytes become arrays of byte values."""
    return json.dumps(_jsonable(obj), indent=indent, sort_keys=sort_keys, ensure_ascii=True,
                      default=repr)
