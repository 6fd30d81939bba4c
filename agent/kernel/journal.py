"""An append-only journal of checksummed CBOR records on flash.

Records are framed as :mod:`agent.kernel.journalfmt` says (docs/journal.md has the layout).

* ``append(t, data, sync=True)`` writes the record and ``fdatasync``\\ s: use it for state
  changes.  ``sync=False`` keeps the record in a small user-space buffer that is written
  with the next synced record, when the buffer fills, on ``flush()`` or on ``close()``:
  flash pages are written far less often, at the price of losing those records on a crash.
* Replay (``scan``, ``read_journal``, ``Journal.replay``) yields the valid records.  A torn
  tail (a short record, or bad bytes with no valid record after them) is ignored, and cut
  off when the journal is opened for writing.  Corruption in the middle is skipped by
  scanning for the next magic that starts a record with a valid CRC; skipped regions are
  counted and reported, never raised.
* The file is bounded: when a record would take it past ``max_bytes`` the owner's
  *snapshot* function is asked for the current state as records, which are written to a
  temporary file, fsynced, renamed over the journal and the directory fsynced (atomic
  compaction).  A record that still does not fit is refused (``E_JOURNAL_FULL``), and so
  is one the file system has no room for: nothing is written, nothing written before is
  lost, replay keeps working.  ``check_room`` lets the owner refuse new state early.

Paths and the clock are parameters; the journal is not thread-safe (one event loop).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError, KernelError
from agent.kernel.journalfmt import (
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    VERSION,
    JournalError,
    Record,
    ScanResult,
    encode_record,
    read_journal,
    scan,
)

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_PAYLOAD",
    "VERSION",
    "Journal",
    "JournalError",
    "JournalFullError",
    "JournalStats",
    "Record",
    "ScanResult",
    "Snapshot",
    "encode_record",
    "fsync_dir",
    "read_journal",
    "scan",
]

Snapshot = Callable[[], Iterable[tuple[str, Mapping[str, Any]]]]
"""Returns the owner's current state as ``(type, data)`` records, in replay order."""


class JournalFullError(JournalError):
    """A record was refused for want of room: the journal's bound (``errno`` None) or its
    file system (``errno`` ENOSPC, EDQUOT or EFBIG).  Nothing was written."""

    def __init__(self, message: str, hint: str, *, errno: int | None = None) -> None:
        super().__init__(message, hint, code="E_JOURNAL_FULL")
        self.errno = errno


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


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
    refused: int = 0  # appends refused: bound reached, file system full, I/O error
    rewrites: int = 0  # compactions made to resynchronise the file after a failed write

    def to_wire(self) -> dict[str, int]:
        return dict(vars(self))


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable (its entry on disk)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """An open journal file, appended to by one owner.

    ``snapshot`` (settable later through the attribute) enables compaction; without it a
    full journal refuses records.  The snapshot must reflect every record appended so
    far: compaction runs at the start of an ``append``, before the new record is written,
    so an owner that updates its memory right after ``append`` returns satisfies this
    (and one that does not when ``append`` raises keeps journal and memory in step).
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
        self._stale = False  # a write failed half-way: rewrite the file before appending
        self._appended = True  # records appended since the last compaction
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
                fsync_dir(self.path.parent)
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
        """Append one record; with ``sync`` it is on flash when this returns.

        Raises, with nothing appended and the sequence number not used: JournalError (not
        encodable, too large), JournalFullError (no room within ``max_bytes`` even after
        compaction, or the file system is full), KernelError (another I/O error).  After a
        failed fdatasync the record may be in the file, unacknowledged: its sequence number
        is used, and the next append rewrites the file from the snapshot first.
        """
        self._require_fd()
        d, ts = dict(data or {}), self.clock()
        frame = encode_record(t, self._next_seq, ts, d)  # first: a bad record changes nothing
        if self._stale and self.snapshot is not None:
            with contextlib.suppress(AgentError):  # still stale: append after what is there
                self.compact()
                self.stats.rewrites += 1
                frame = encode_record(t, self._next_seq, ts, d)
        if self.size + len(frame) > self.max_bytes:
            try:  # (a compaction right after one would write the same: no flash for that)
                if self.snapshot is not None and self._appended:
                    self.compact()
                    frame = encode_record(t, self._next_seq, ts, d)
                if self.size + len(frame) > self.max_bytes:
                    raise self._bound_error(t, len(frame))
            except AgentError:
                self.stats.refused += 1
                raise
        seq = self._next_seq
        self._pending += frame
        try:
            if sync:
                self.flush(sync=True)
            elif len(self._pending) >= self.buffer_bytes:
                self.flush(sync=False)
        except AgentError:
            self.stats.refused += 1
            if self._pending.endswith(frame):  # not written: forget it, keep what came before
                del self._pending[-len(frame):]
            else:  # written but its fdatasync failed: the seq is taken, the file is suspect
                self._next_seq += 1
                self._stale = True
            raise
        self._next_seq += 1
        self._appended = True
        self.stats.appends += 1
        if sync:
            self.stats.synced_appends += 1
        return Record(t, seq, ts, d)

    def _bound_error(self, t: str, need: int) -> JournalFullError:
        return JournalFullError(
            f"journal {self.path} is full: {self.size} of its {self.max_bytes} bytes hold "
            f"live state after compaction; record {t!r} ({need} bytes) not written",
            "stop cells that are no longer needed, or raise [logs] journal_max in "
            "agentd.toml")

    def mark_stale(self) -> None:
        """The owner's state moved on without its record (a refused append it could not
        take back): the next append first rewrites the file from the snapshot."""
        self._stale = True

    def check_room(self, extra: int, what: str) -> None:
        """Refuse (JournalFullError) new state of about ``extra`` bytes unless the live
        state plus it fits in half of ``max_bytes``: the other half is the room that the
        records of existing state (transitions, plans, destroys) and compaction need."""
        live = self.live_bytes()
        if live + extra > self.max_bytes // 2:
            self.stats.refused += 1
            raise JournalFullError(
                f"journal {self.path} has no room for {what}: about {extra} bytes beside "
                f"the {live} of the live state, over half of journal_max "
                f"({self.max_bytes} bytes)",
                "stop cells that are no longer needed, or raise [logs] journal_max in "
                "agentd.toml")

    def live_bytes(self) -> int:
        """What a compaction would write now (the file's size without a snapshot)."""
        if self.snapshot is None:
            return self.size
        return len(self._snapshot_blob()[0])

    def flush(self, *, sync: bool = True) -> None:
        """Write buffered records; with ``sync`` also fdatasync anything written unsynced.

        On a failed write the file is cut back and the records stay buffered."""
        fd = self._require_fd()
        if self._pending:
            data = bytes(self._pending)
            try:
                self._write_all(fd, data)
            except OSError as exc:
                self._rollback(fd)
                raise self._io_error("write", exc) from exc
            self._size += len(data)
            self._pending.clear()
            self._dirty = True
        if sync and self._dirty:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                self._stale = True  # the kernel may have dropped the pages: rewrite
                raise self._io_error("fdatasync", exc) from exc
            self.stats.fsyncs += 1
            self._dirty = False

    def _io_error(self, op: str, exc: OSError) -> AgentError:
        if exc.errno in _NO_ROOM:
            return JournalFullError(
                f"{op} journal `{self.path}`: {os.strerror(exc.errno or 0)} "
                f"({errno.errorcode.get(exc.errno or 0, exc.errno)})",
                f"free space on the file system of {self.path.parent} (df "
                f"{self.path.parent}); agentd keeps serving and journals again when there "
                "is room", errno=exc.errno)
        return KernelError.from_oserror(op, str(self.path), exc)

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            self.stats.write_calls += 1
            self.stats.bytes_written += n
            view = view[n:]

    def _rollback(self, fd: int) -> None:
        """After a failed write, cut the partial write off so later appends stay readable."""
        try:
            os.ftruncate(fd, self._size)
        except OSError:
            self._stale = True  # replay skips the partial record; rewrite it away later

    # -- compaction ----------------------------------------------------------------------

    def _snapshot_blob(self) -> tuple[bytes, int]:
        """The compacted journal's bytes and its number of records."""
        if self.snapshot is None:
            raise JournalError(f"journal {self.path} has no snapshot function",
                               "set Journal.snapshot before compacting")
        items = list(self.snapshot())
        ts = self.clock()
        frames = [encode_record("snapshot", self._next_seq,
                                ts, {"records": len(items), "after_seq": self._next_seq - 1})]
        for i, (t, data) in enumerate(items, start=1):
            frames.append(encode_record(t, self._next_seq + i, ts, data))
        return b"".join(frames), len(frames)

    def compact(self) -> None:
        """Replace the journal by the owner's snapshot, atomically."""
        old_fd = self._require_fd()
        blob, count = self._snapshot_blob()
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
            raise self._io_error("compact", exc) from exc
        # The new file is in place: from here on, append to it whatever happens.
        self._next_seq += count
        os.close(old_fd)
        self._fd = fd
        self._size = len(blob)
        self._pending.clear()  # the snapshot covers the buffered records
        self._dirty = False
        self._stale = self._appended = False
        self.stats.compactions += 1
        try:
            fsync_dir(self.path.parent)
        except OSError as exc:
            raise KernelError.from_oserror("fsync", str(self.path.parent), exc) from exc
        self.stats.fsyncs += 1

    # -- reading and closing -------------------------------------------------------------

    def replay(self) -> Iterator[Record]:
        """The valid records in the file now, then the buffered ones (nothing is written:
        replay works on a full file system too)."""
        records = read_journal(self.path).records
        if self._pending:
            records += scan(bytes(self._pending)).records
        return iter(records)

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

    def mark_stale(self) -> None:
        with self.lock:
            self.journal.mark_stale()

    def check_room(self, extra: int, what: str) -> None:
        with self.lock:
            self.journal.check_room(extra, what)
