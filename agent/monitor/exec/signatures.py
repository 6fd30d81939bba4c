"""The signature database of channel 1 (pure): hashes of files no cell may execute.

A text file, one SHA-256 per line with an optional name, ``#`` comments and blank lines
ignored, readable and editable over a serial console::

    # agent-signatures 1
    0d5c6d0e...(64 hex digits)  mirai.arm7
    5b1e...                     coinminer dropper, 2026-11

The first line must be the header: a file without it (empty, truncated to nothing,
another format, a half-copied binary) is refused as a whole (:class:`SignatureFileError`)
and the service keeps the database it had, so the database is never emptied by
accident; to empty it on purpose, write the header alone.  A malformed line (not 64 hex
digits, a digest listed twice) is reported with its number (:class:`BadLine`) and
skipped; the other lines load.  Hex digits may be upper or lower case.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.core.errors import ConfigError

__all__ = ["HEADER", "MAX_BYTES", "BadLine", "SignatureDB", "SignatureFileError", "parse"]

HEADER = "# agent-signatures 1"
MAX_BYTES = 8 << 20  # about 100,000 signatures: more is not a file someone meant
_HEX = frozenset("0123456789abcdef")


class SignatureFileError(ConfigError):
    """The whole file is refused (``E_SIGNATURES``); the previous database stays."""

    def __init__(self, source: str, what: str, hint: str | None = None) -> None:
        super().__init__("E_SIGNATURES", f"{source}: {what}",
                         hint or f"the first line must be {HEADER!r}, then one SHA-256 "
                         "(64 hex digits) and an optional name per line")


@dataclass(frozen=True)
class BadLine:
    line: int
    problem: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.problem}"


@dataclass(frozen=True)
class SignatureDB:
    digests: Mapping[str, str] = field(default_factory=dict)  # hex SHA-256 -> name

    def __len__(self) -> int:
        return len(self.digests)

    def diff(self, old: SignatureDB) -> tuple[int, int]:
        """(added, removed) since ``old``."""
        new, was = set(self.digests), set(old.digests)
        return len(new - was), len(was - new)


def parse(data: bytes, source: str = "<signatures>") -> tuple[SignatureDB, list[BadLine]]:
    """The database in ``data`` and its bad lines; SignatureFileError for a whole-file
    error (too big, not UTF-8 text, no header)."""
    if len(data) > MAX_BYTES:
        raise SignatureFileError(source, f"{len(data)} bytes, more than {MAX_BYTES}",
                                 "split it or remove old entries")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SignatureFileError(source, f"not UTF-8 text (byte {exc.start})") from None
    lines = text.split("\n")
    if lines[0].rstrip("\r").strip() != HEADER:
        raise SignatureFileError(source, f"line 1 is not {HEADER!r}")
    out: dict[str, str] = {}
    bad: list[BadLine] = []
    for no, raw in enumerate(lines[1:], 2):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        digest, name = parts[0].lower(), parts[1].replace("\t", " ") if len(parts) > 1 else ""
        if len(digest) != 64 or not set(digest) <= _HEX:
            bad.append(BadLine(no, f"{digest[:20]!r} is not a SHA-256 (64 hex digits)"))
        elif digest in out:
            bad.append(BadLine(no, f"{digest[:12]}... is listed twice (first as "
                                   f"{out[digest] or 'unnamed'!r})"))
        elif any(ord(c) < 32 for c in name):
            bad.append(BadLine(no, "the name holds control characters"))
        else:
            out[digest] = name[:128]
    return SignatureDB(out), bad
