"""An append-only journal of checksummed CBOR records on flash.

Every record is framed as (see docs/journal.md for the byte-by-byte layout)::

    magic b"\\xf7J" | version u8 | payload length u32 BE | CRC32 u32 BE | CBOR payload

and the payload is a map ``{"t": type, "seq": n, "ts": time, "d": {...data}}``.

* ``append(t, data, sync=True)`` writes the record and ``fdatasync``\\ s: use it for state
  changes.  ``sync=False`` keeps the record in a small user-space buffer that is written
  with the next synced record, when the buffer fills, on ``flush()`` or on ``close()``:
  flash pages are written far less often, at the price of losing those records on a crash.
* Replay (``scan``, ``read_journal``, ``Journal.replay``) yields the valid records.  A torn
  tail (a short record, or bad bytes with no valid record after them) is ignored, and cut
  off when the journal is opened for writing.  Corruption in the middle is skipped by
  scanning for the next magic that starts a record with a valid CRC; skipped regions are
  counted and reported, never raised.
* The file is bounded: when it would grow past ``max_bytes`` the owner's *snapshot*
  function is asked for the current state as records, which are written to a temporary
  file, fsynced, renamed over the journal and the directory fsynced (atomic compaction).

Paths and the clock are parameters; the journal is not thread-safe (one event loop).
"""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    "Journal",
    "JournalError",
    "JournalStats",
    "Record",
    "ScanResult",
    "Snapshot",
    "encode_record",
    "read_journal",
    "scan",
]

MAGIC = b"\xf7J"
VERSION = 1
HEADER = struct.Struct(">2sBII")  # magic, version, payload length, crc32(payload)
MAX_PAYLOAD = 256 * 1024

Snapshot = Callable[[], Iterable[tuple[str, Mapping[str, Any]]]]
"""Returns the owner's current state as ``(type, data)`` records, in replay order."""


class JournalError(AgentError):
    """A record cannot be journaled (not CBOR-encodable, too large)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__("E_JOURNAL", message, hint)


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


@dataclass
class JournalStats:
    """Flash wear and health counters of one open journal."""

    appends: int = 0
    synced_appends: int = 0
    write_calls: int = 0
    bytes_written: int = 0
    fsyncs: int = 0
    compactions: int = 0
    truncated_bytes: int = 0  # torn tail cut off at open
    skipped_bytes: int = 0  # corrupt bytes skipped in the middle at open

    def to_wire(self) -> dict[str, int]:
        return dict(vars(self))


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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """An open journal file, appended to by one owner.

    ``snapshot`` (settable later through the attribute) enables compaction; without it the
    file is not bounded.  The snapshot must reflect every record appended so far: compaction
    runs at the start of an ``append``, before the new record is written, so an owner that
    updates its memory right after ``append`` returns satisfies this.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 1 << 20,
                 snapshot: Snapshot | None = None, clock: Callable[[], float] = time.time,
                 buffer_bytes: int = 4096) -> None:
        if max_bytes < 4096:
            raise ValueError(f"max_bytes {max_bytes} is too small (minimum 4096)")
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.max_bytes = max_bytes
        self.snapshot = snapshot
        self.clock = clock
        self.buffer_bytes = buffer_bytes
        self.stats = JournalStats()
        self._pending = bytearray()
        self._dirty = False  # written to the file but not yet fdatasync'd
        self._threshold = max_bytes
        self._fd: int | None = None

        self.tmp_path.unlink(missing_ok=True)  # a compaction that crashed before its rename
        existed = self.path.exists()
        self.opened = read_journal(self.path)
        self._next_seq = max((r.seq for r in self.opened.records), default=0) + 1
        self.stats.skipped_bytes = self.opened.skipped_bytes
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                               0o600)
            if self.opened.torn_bytes:
                os.ftruncate(self._fd, self.opened.end)
                os.fsync(self._fd)
                self.stats.fsyncs += 1
                self.stats.truncated_bytes = self.opened.torn_bytes
            if not existed:
                _fsync_dir(self.path.parent)
        except OSError as exc:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            raise KernelError.from_oserror("open journal", str(self.path), exc) from exc
        self._size = self.opened.end

    # -- writing -------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes in the file plus bytes still buffered."""
        return self._size + len(self._pending)

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def _require_fd(self) -> int:
        if self._fd is None:
            raise JournalError(f"journal {self.path} is closed")
        return self._fd

    def append(self, t: str, data: Mapping[str, Any] | None = None, *, sync: bool) -> Record:
        """Append one record; with ``sync`` it is on flash when this returns."""
        self._require_fd()
        if self.snapshot is not None and self.size > self._threshold:
            self.compact()
        record = Record(t, self._next_seq, self.clock(), dict(data or {}))
        frame = encode_record(record.t, record.seq, record.ts, record.data)
        self._next_seq += 1
        self._pending += frame
        self.stats.appends += 1
        if sync:
            self.stats.synced_appends += 1
            self.flush(sync=True)
        elif len(self._pending) >= self.buffer_bytes:
            self.flush(sync=False)
        return record

    def flush(self, *, sync: bool = True) -> None:
        """Write buffered records; with ``sync`` also fdatasync anything written unsynced."""
        fd = self._require_fd()
        if self._pending:
            data = bytes(self._pending)
            try:
                self._write_all(fd, data)
            except OSError as exc:
                self._rollback(fd)
                raise KernelError.from_oserror("write", str(self.path), exc) from exc
            self._size += len(data)
            self._pending.clear()
            self._dirty = True
        if sync and self._dirty:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                raise KernelError.from_oserror("fdatasync", str(self.path), exc) from exc
            self.stats.fsyncs += 1
            self._dirty = False

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            self.stats.write_calls += 1
            self.stats.bytes_written += n
            view = view[n:]

    def _rollback(self, fd: int) -> None:
        """After a failed write, cut a partial record off so later appends stay readable."""
        try:
            os.ftruncate(fd, self._size)
        except OSError:
            pass  # replay skips the partial record anyway
        self._pending.clear()

    # -- compaction ----------------------------------------------------------------------

    def compact(self) -> None:
        """Replace the journal by the owner's snapshot, atomically."""
        old_fd = self._require_fd()
        if self.snapshot is None:
            raise JournalError(f"journal {self.path} has no snapshot function",
                               "set Journal.snapshot before compacting")
        items = list(self.snapshot())
        ts = self.clock()
        frames = [encode_record("snapshot", self._next_seq,
                                ts, {"records": len(items), "after_seq": self._next_seq - 1})]
        for i, (t, data) in enumerate(items, start=1):
            frames.append(encode_record(t, self._next_seq + i, ts, data))
        blob = b"".join(frames)
        fd = -1
        try:
            fd = os.open(self.tmp_path,
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
            self._write_all(fd, blob)
            os.fsync(fd)
            self.stats.fsyncs += 1
            os.replace(self.tmp_path, self.path)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            self.tmp_path.unlink(missing_ok=True)
            raise KernelError.from_oserror("compact", str(self.path), exc) from exc
        # The new file is in place: from here on, append to it whatever happens.
        self._next_seq += len(frames)
        os.close(old_fd)
        self._fd = fd
        self._size = len(blob)
        self._pending.clear()  # the snapshot covers the buffered records
        self._dirty = False
        self._threshold = max(self.max_bytes, 2 * len(blob))
        self.stats.compactions += 1
        try:
            _fsync_dir(self.path.parent)
        except OSError as exc:
            raise KernelError.from_oserror("fsync", str(self.path.parent), exc) from exc
        self.stats.fsyncs += 1

    # -- reading and closing -------------------------------------------------------------

    def replay(self) -> Iterator[Record]:
        """The valid records in the file now (buffered records are written first)."""
        if self._fd is not None:
            self.flush(sync=False)
        return iter(read_journal(self.path).records)

    def close(self) -> None:
        """Write and fdatasync buffered records, then close."""
        if self._fd is None:
            return
        try:
            self.flush(sync=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def abandon(self) -> None:
        """Drop the descriptor without writing buffered records: what kill -9 does.

        For crash tests, and for a master that re-execs itself after an attack.
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._pending.clear()

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LockedJournal:
    """The journal shared by the loop and the executor's worker threads."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.lock = threading.RLock()

    def append(self, t: str, data: Mapping[str, Any] | None = None, *, sync: bool) -> Record:
        with self.lock:
            return self.journal.append(t, data, sync=sync)

    def replay(self) -> Iterable[Record]:
        with self.lock:
            return list(self.journal.replay())

    def compact(self) -> None:
        with self.lock:
            self.journal.compact()
