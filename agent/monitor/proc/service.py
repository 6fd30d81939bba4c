"""The process channel on agentd's loop: the proc connector read in bounded slices, each
message through the tracker (agent.monitor.proc.rules), each event of a cell's process on
the bus.

One wake-up reads at most :data:`SLICE` datagrams (one message each), so a fork storm in a
cell cannot hold the loop: the socket stays readable and the loop comes back to it after
the others had their turn.  The bus coalesces the events per cell and kind (a burst, then
a rate, then one ``suppressed`` summary); the service never drops events on its own.

When the kernel's receive buffer overflowed (``ENOBUFS``) some messages were lost, an exit
among them perhaps, so the pid cache is cleared (it refills by lookups) and one
``proc/lost`` notice says so.  When the connector cannot be opened (not root, a kernel
without ``CONFIG_PROC_EVENTS``) the channel reports ``master/monitor-failed`` once and
stays off: cells run, without process events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from agent.core.errors import KernelError
from agent.core.events import Severity
from agent.kernel.nlsock import McastSocket
from agent.monitor.proc import adapter
from agent.monitor.proc.rules import Tracker, parse

__all__ = ["SLICE", "Emitter", "ProcMonitor"]

log = logging.getLogger(__name__)

SLICE = 64  # datagrams per wake-up


class Emitter(Protocol):
    """What the service needs of the event bus (agent.daemon.bus.EventBus)."""

    def emit(self, channel: str, kind: str, *, cell: str | None = None,
             severity: Severity = "info", **attrs: Any) -> object: ...


class ProcMonitor:
    """``cell_of`` is the cgroup backend's ``pid_to_cell``; ``opener`` makes the socket
    (tests pass one of their own)."""

    def __init__(self, bus: Emitter, cell_of: Callable[[int], str | None], *,
                 proc: Path = Path("/proc"), self_pid: int | None = None,
                 opener: Callable[[], McastSocket] = adapter.open_connector) -> None:
        self.bus = bus
        self.reader = adapter.ProcReader(cell_of, proc)
        self.tracker = Tracker(self.reader, self_pid=os.getpid() if self_pid is None
                               else self_pid)
        self.opener = opener
        self.sock: McastSocket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.problem: str | None = None
        self.counts = {"messages": 0, "fork": 0, "exec": 0, "uid": 0, "exit": 0,
                       "overruns": 0, "wakeups": 0}

    async def start(self) -> bool:
        """Open the connector (off the loop: it waits for the kernel's answer) and read
        it on the loop; False (and one event) when it cannot be had."""
        self.loop = asyncio.get_running_loop()
        try:
            sock = await asyncio.to_thread(self.opener)
        except (KernelError, OSError) as exc:
            self.problem = str(exc)
            hint = exc.hint if isinstance(exc, KernelError) else None
            log.error("process events unavailable: %s", exc)
            self.bus.emit("master", "monitor-failed", severity="notice", monitor="proc",
                          error=str(exc), hint=hint)
            return False
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._on_readable)
        log.info("process events: proc connector open")
        return True

    def _on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        self.counts["wakeups"] += 1
        try:
            got = sock.read(SLICE)
        except KernelError as exc:  # the socket broke: report once, stop reading
            log.error("process events: %s", exc)
            self.problem = str(exc)
            self.bus.emit("master", "monitor-failed", severity="notice", monitor="proc",
                          error=str(exc), hint=None)
            self._stop_reading()
            return
        if got.overrun:
            self.counts["overruns"] += 1
            self.tracker.reset()
            self.bus.emit("proc", "lost", severity="notice", overruns=sock.lost,
                          why="the kernel's receive buffer overflowed: process events "
                              "were lost, the pid cache starts again")
        handle, emit, counts = self.tracker.handle, self.bus.emit, self.counts
        for data in got.datagrams:
            for m in parse(data):
                counts["messages"] += 1
                out = handle(m)
                if out is not None:
                    counts[out.kind] += 1
                    emit("proc", out.kind, cell=out.cell, severity=out.severity, **out.attrs)

    def cell_of(self, hpid: int) -> str | None:
        """Cheap attribution for other monitors: the pid cache, else ``/proc``."""
        return self.tracker.cell_of(hpid)

    def status(self) -> dict[str, Any]:
        return {"running": self.sock is not None, "problem": self.problem,
                "cached": len(self.tracker), "lost": 0 if self.sock is None else self.sock.lost,
                **self.counts, **self.tracker.counts}

    def _stop_reading(self) -> None:
        if self.sock is not None:
            if self.loop is not None:
                with contextlib.suppress(ValueError, OSError):
                    self.loop.remove_reader(self.sock.fileno())
            adapter.close_connector(self.sock)
            self.sock = None

    async def close(self) -> None:
        self._stop_reading()
