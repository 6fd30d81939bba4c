"""Following agentd's journal from outside, as it is written (the soak's killer, issue 10).

:class:`JournalWatch` follows ``agent.journal`` through inotify: each complete record as it
reaches the file, and the compaction's temporary file as it is created.  A trigger armed
on it acts (the soak: SIGKILLs agentd) the moment a chosen record, or a compaction, shows
up, so that kills land at chosen points of a plan, not only at random moments.
:func:`trigger_for` makes the trigger of each of :data:`PHASES`.  Nothing in agentd knows
it is being watched.
"""

from __future__ import annotations

import ctypes
import os
import random
import select
import struct
import threading
from collections.abc import Callable
from typing import Any

from cellkit import JOURNAL

from agent.kernel.journal import Record, scan

__all__ = ["PHASES", "TMP", "JournalWatch", "Match", "trigger_for"]

TMP = JOURNAL.with_name(JOURNAL.name + ".tmp")
# Where a kill is aimed: a step of a create or destroy plan (right after its plan-begin
# or its op-done k, k random), a pin (its record is written before the cgroup is
# changed), a compaction (its temporary file appears), the lease record that comes before
# a cell's first record, or no record at all (a random moment).
PHASES = ("create", "destroy", "pin", "compaction", "lease", "random")

_IN_MODIFY, _IN_CREATE, _IN_MOVED_TO = 0x2, 0x100, 0x80
_EVENT = struct.Struct("iIII")

Match = Callable[[Record | None], bool]


class JournalWatch:
    """Records as they reach ``agent.journal``; :meth:`arm` acts on one at once."""

    def __init__(self) -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self.fd, str(JOURNAL.parent).encode(),
                                  _IN_MODIFY | _IN_CREATE | _IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {JOURNAL.parent}")
        self._file: Any = None
        self._buf = b""
        self._skip = 0  # records of a snapshot just read: rewritten state, not new steps
        self._lock = threading.Lock()
        self._trigger: tuple[Match, Callable[[str], None]] | None = None
        self.fired = ""
        self.compactions = 0
        self.records = 0
        self._stop = False
        self._reopen(at_end=True)
        self._thread = threading.Thread(target=self._run, name="journal-watch", daemon=True)
        self._thread.start()

    def arm(self, match: Match, action: Callable[[str], None]) -> None:
        """``action(what)`` once, at the first record (or compaction: None) ``match`` takes."""
        with self._lock:
            self.fired = ""
            self._trigger = (match, action)

    def disarm(self) -> None:
        with self._lock:
            self._trigger = None

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        os.close(self.fd)
        if self._file is not None:
            self._file.close()

    def _reopen(self, at_end: bool = False) -> None:
        if self._file is not None:
            self._file.close()
        try:
            self._file = JOURNAL.open("rb")
            if at_end:
                self._file.seek(0, os.SEEK_END)
        except FileNotFoundError:
            self._file = None
        self._buf = b""

    def _fire(self, rec: Record | None, what: str) -> None:
        with self._lock:
            trig = self._trigger
            if trig is None or not trig[0](rec):
                return
            self._trigger = None
            self.fired = what
        trig[1](what)

    def _run(self) -> None:
        while not self._stop:
            if not select.select([self.fd], [], [], 0.2)[0]:
                continue
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            off = 0
            while off + _EVENT.size <= len(data):
                _, mask, _, length = _EVENT.unpack_from(data, off)
                name = data[off + _EVENT.size: off + _EVENT.size + length].rstrip(b"\0")
                off += _EVENT.size + length
                if name == TMP.name.encode() and mask & _IN_CREATE:
                    self.compactions += 1
                    self._fire(None, "compaction")
                elif name == JOURNAL.name.encode() and mask & (_IN_MOVED_TO | _IN_CREATE):
                    self._reopen()
                    self._follow()
                elif name == JOURNAL.name.encode() and mask & _IN_MODIFY:
                    self._follow()

    def _follow(self) -> None:
        if self._file is None:
            self._reopen()
            if self._file is None:
                return
        self._buf += self._file.read()
        got = scan(self._buf)
        self._buf = self._buf[got.end:]
        for rec in got.records:
            self.records += 1
            if rec.t == "snapshot":
                self._skip = int(rec.data.get("records", 0))
                continue
            if self._skip:
                self._skip -= 1
                continue
            step = f" #{rec.data['i']}" if "i" in rec.data else ""
            self._fire(rec, f"{rec.t}{step} {rec.data.get('plan', rec.data.get('name', ''))}")


def trigger_for(phase: str, rng: random.Random) -> Match:
    if phase in ("create", "destroy"):
        # the first such plan to begin: right after its plan-begin, or after its op-done
        # k, k drawn from the plan's own steps (so that the point is always reached)
        chosen: dict[str, object] = {}

        def step(rec: Record | None) -> bool:
            if rec is None or not str(rec.data.get("plan", "")).startswith(phase + "-"):
                return False
            if rec.t == "plan-begin" and not chosen:
                ops = rec.data.get("ops")
                k = rng.randint(-1, max(len(ops) if isinstance(ops, list) else 1, 1) - 1)
                chosen.update(plan=rec.data["plan"], k=k)
                return k < 0
            return (rec.t == "op-done" and rec.data.get("plan") == chosen.get("plan")
                    and rec.data.get("i") == chosen.get("k"))
        return step
    if phase == "pin":
        return lambda r: r is not None and r.t == "cell" and r.data.get("pin") is not None
    if phase == "lease":
        return lambda r: r is not None and r.t == "lease"
    if phase == "compaction":
        return lambda r: r is None
    raise ValueError(f"unknown phase {phase!r}")
