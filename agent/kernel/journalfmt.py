"""The journal's record format: frames, their encoding, and the scan that replays them.

A journal file is a sequence of frames (docs/journal.md has the byte-by-byte layout)::

    magic b"\\xf7J" | version u8 | payload length u32 BE | CRC32 u32 BE | CBOR payload

and the payload is a map ``{"t": type, "seq": n, "ts": time, "d": {...data}}``.
:func:`scan` never raises on content: it returns the valid records, the corrupt regions
it skipped and the torn tail.  The open, appended-to file is :mod:`agent.kernel.journal`.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from agent.core.errors import AgentError, KernelError

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_PAYLOAD",
    "VERSION",
    "JournalError",
    "Record",
    "ScanResult",
    "encode_record",
    "read_journal",
    "scan",
]

MAGIC = b"\xf7J"
VERSION = 1
HEADER = struct.Struct(">2sBII")  # magic, version, payload length, crc32(payload)
MAX_PAYLOAD = 256 * 1024


class JournalError(AgentError):
    """A record cannot be journaled (not CBOR-encodable, too large)."""

    def __init__(self, message: str, hint: str | None = None, *, code: str = "E_JOURNAL"
                 ) -> None:
        super().__init__(code, message, hint)


@dataclass(frozen=True)
class Record:
    """One journal record: its type ``t``, sequence number, timestamp and data map."""

    t: str
    seq: int
    ts: float
    data: Mapping[str, Any]


@dataclass
class ScanResult:
    """What replay found in a journal image."""

    records: list[Record] = field(default_factory=list)
    skipped: list[tuple[int, int]] = field(default_factory=list)  # (offset, length)
    end: int = 0  # offset just past the last valid record
    torn_bytes: int = 0  # bytes after ``end`` that form no valid record

    @property
    def skipped_bytes(self) -> int:
        return sum(length for _, length in self.skipped)


def encode_record(t: str, seq: int, ts: float, data: Mapping[str, Any]) -> bytes:
    """Frame one record; raises :class:`JournalError` if it cannot be journaled."""
    try:
        payload = cbor2.dumps({"t": t, "seq": seq, "ts": ts, "d": dict(data)})
    except Exception as exc:  # cbor2 raises CBOREncodeError, TypeError, ValueError...
        raise JournalError(f"record {t!r} is not CBOR-encodable: {exc}",
                           "journal only str, int, float, bool, None, bytes, lists and maps"
                           ) from exc
    if len(payload) > MAX_PAYLOAD:
        raise JournalError(f"record {t!r} is {len(payload)} bytes, over {MAX_PAYLOAD}",
                           "keep journal records small; store bulk data elsewhere")
    return HEADER.pack(MAGIC, VERSION, len(payload), zlib.crc32(payload)) + payload


def _parse_at(buf: bytes, pos: int) -> tuple[Record, int] | None:
    """The record starting at ``pos`` and the offset after it, or None if there is none."""
    if len(buf) - pos < HEADER.size:
        return None
    magic, version, length, crc = HEADER.unpack_from(buf, pos)
    if magic != MAGIC or version != VERSION or length > MAX_PAYLOAD:
        return None
    start = pos + HEADER.size
    end = start + length
    if end > len(buf):
        return None
    payload = buf[start:end]
    if zlib.crc32(payload) != crc:
        return None
    try:
        obj = cbor2.loads(payload)
    except Exception:  # a valid CRC over bytes we did not write: treat as corrupt
        return None
    if not isinstance(obj, dict):
        return None
    t, seq, ts, data = obj.get("t"), obj.get("seq"), obj.get("ts"), obj.get("d")
    if (not isinstance(t, str) or not isinstance(seq, int) or isinstance(seq, bool)
            or not isinstance(ts, int | float) or not isinstance(data, dict)):
        return None
    return Record(t, seq, float(ts), data), end


def scan(buf: bytes) -> ScanResult:
    """Replay a journal image: valid records, skipped corrupt regions, the torn tail."""
    result = ScanResult()
    pos = 0
    while pos < len(buf):
        parsed = _parse_at(buf, pos)
        if parsed is not None:
            record, pos = parsed
            result.records.append(record)
            result.end = pos
            continue
        nxt = buf.find(MAGIC, pos + 1)
        while nxt != -1 and _parse_at(buf, nxt) is None:
            nxt = buf.find(MAGIC, nxt + 1)
        if nxt == -1:
            result.torn_bytes = len(buf) - pos
            break
        result.skipped.append((pos, nxt - pos))
        pos = nxt
    return result


def read_journal(path: str | os.PathLike[str]) -> ScanResult:
    """Replay the journal at ``path`` without modifying it (a missing file is empty)."""
    try:
        buf = Path(path).read_bytes()
    except FileNotFoundError:
        return ScanResult()
    except OSError as exc:
        raise KernelError.from_oserror("read", os.fspath(path), exc) from exc
    return scan(buf)
