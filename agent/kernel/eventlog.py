"""The persistent event log: alerts and state changes, kept across restarts, bounded
for flash.

Records use the journal's framing (:func:`agent.kernel.journal.encode_record`: magic,
length, CRC32, CBOR), one ``event`` record per event, so a torn tail after a power cut is
ignored on reading.  The log is two files, ``events.log`` and ``events.log.1``: when the
current one would pass half of ``max_bytes`` it is renamed over the older one and a new
one begun, so the log never holds more than ``max_bytes`` and always the newest half or
more of what fits.  Writes come in batches from the event bus's queued sink (never one
write per packet); a batch holding an alert or a state change is ``fdatasync``\\ ed, at
most once per ``sync_interval`` seconds otherwise (flash wear).  Reading is for
``agentctl events --persisted`` and for the respawned master (its own events survive).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.core.events import Event
from agent.kernel.journal import JournalError, encode_record, read_journal

__all__ = ["EventLog"]

log = logging.getLogger(__name__)


class EventLog:
    """Append-only, size-bounded event log at ``path`` (and ``path.1``)."""

    def __init__(self, path: Path, *, max_bytes: int = 256 << 10, sync_interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 8192:
            raise ValueError("max_bytes must be at least 8 KiB")
        self.path = path
        self.old = path.with_name(path.name + ".1")
        self.max_bytes = max_bytes
        self.sync_interval = sync_interval
        self.clock = clock
        self.written = 0  # events written
        self.failed = 0  # batches that could not be written
        self._fd = -1
        self._size = 0
        self._seq = 0
        self._last_sync = float("-inf")
        self._pending: list[Event] = []

    def _open(self) -> int:
        if self._fd < 0:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                         0o600)
            self._fd, self._size = fd, os.fstat(fd).st_size
        return self._fd

    def _rotate(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        os.replace(self.path, self.old)

    def add(self, event: Event) -> None:
        """Queue one event for the next :meth:`flush` (the bus's queued sink calls ``add``
        for each event of a batch, then ``flush`` once)."""
        self._pending.append(event)

    def flush(self) -> None:
        """Write what is pending; errors are logged and counted, the events dropped (a
        full or broken state filesystem must not stop agentd)."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        data = b"".join(self._encode(e) for e in batch)
        if not data:
            return
        try:
            fd = self._open()
            if self._size + len(data) > self.max_bytes // 2 and self._size > 0:
                self._rotate()
                fd = self._open()
            os.write(fd, data)
            self._size += len(data)
            self.written += len(batch)
            urgent = any(e.severity == "alert" for e in batch)
            now = self.clock()
            if urgent or now - self._last_sync >= self.sync_interval:
                os.fdatasync(fd)
                self._last_sync = now
        except OSError as exc:
            self.failed += 1
            log.error("event log %s: %s (%d events not kept)", self.path, exc, len(batch))
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _encode(self, e: Event) -> bytes:
        self._seq += 1
        try:
            return encode_record("event", self._seq, e.ts, e.to_wire())
        except JournalError as exc:  # an attribute that is not CBOR, or a huge one
            self.failed += 1
            log.error("event log: %s/%s not kept: %s", e.channel, e.kind, exc)
            return b""

    def read(self, n: int | None = None) -> list[dict[str, Any]]:
        """The last ``n`` events in the log (all if None), oldest first, as wire maps."""
        out: list[dict[str, Any]] = []
        for p in (self.old, self.path):
            out += [dict(r.data) for r in read_journal(p).records if r.t == "event"]
        return out[-n:] if n is not None else out

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

