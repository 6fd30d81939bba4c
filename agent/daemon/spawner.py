"""The cellops ``Spawner`` of agentd: spawn_cell plus everything that comes back from it.

For each running cell it owns, on the daemon's asyncio loop:

* the **pidfd** of the cell's pid 1 (``add_reader``): readable when pid 1 ends; the exit
  status comes from ``waitid(P_PIDFD)`` (agentd is a child subreaper, so pid 1 is its
  child; an adopted cell is not, and its status is unknown) and goes to ``on_exit``;
* the **seccomp listener**: handed at once to ``on_listener(cell, fd, pid)`` (channel 2,
  :mod:`agent.monitor.syscall.service`, which answers, reports and meters the traps);
  an adopted cell's hook call has ``fd`` None.  Without a hook the listener is closed,
  and the kernel answers the cell's trapped calls ENOSYS (fail closed);
* **stdout and stderr**: two FIFOs in the cell's run dir.  The cell gets each opened
  read-write (so it never sees SIGPIPE, even while agentd is down), agentd reads them
  non-blocking into the cell's :class:`~agent.core.logbuf.LogBuffer`.  A restarted agentd
  re-opens the FIFOs of the cells it adopts, so their logs continue; what they wrote
  beyond the pipe buffer (64 KiB) while agentd was down blocked them until it came back.

``start`` and ``stop`` are called by plan operations in the executor's worker thread;
they touch shared state under a lock and leave every loop registration, and the closing
of registered fds, to the loop thread (``call_soon_threadsafe``).  Everything else is
called on the loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import select
import signal
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.core.cell import Exit
from agent.core.cellctx import Paths
from agent.core.errors import KernelError
from agent.core.logbuf import LogBuffer, Stream
from agent.core.ratelimit import TokenBucket
from agent.core.sandbox import SpawnSpec
from agent.daemon.bus import EventBus
from agent.kernel.spawn import Spawned, spawn_cell

__all__ = ["FINISHED_LOGS_KEPT", "CellLimits", "CellSpawner", "ExitCallback", "ListenerCallback",
           "exit_of"]

log = logging.getLogger(__name__)

ExitCallback = Callable[[str, int, Exit], None]
ListenerCallback = Callable[[str, "int | None", int], None]  # cell, listener (None: adopted), pid
FINISHED_LOGS_KEPT = 16  # log buffers of destroyed cells still shown by `agentctl logs`
_STREAMS: tuple[Stream, ...] = ("stdout", "stderr")


@dataclass(frozen=True)
class CellLimits:
    """What one cell may cost agentd's loop.  Over a limit, the cell's pipes are not read
    for a while: the cell blocks in the kernel (its pipe is full), nobody else waits.
    (Its trapped syscalls are metered by channel 2's service the same way.)"""

    output_rate: float = 256 << 10  # bytes per second read from a cell's stdout+stderr
    output_burst: float = 1 << 20
    read_size: int = 65536  # one read per callback: the loop serves other fds in between


def exit_of(res: os.waitid_result | None) -> Exit:
    """An :class:`Exit` from a waitid result (None: status unknown)."""
    if res is None:
        return Exit()
    if res.si_code == os.CLD_EXITED:
        return Exit(code=res.si_status)
    return Exit(signal=res.si_status)


@dataclass(eq=False)
class _Handle:
    cell: str
    pid: int
    pidfd: int
    listener: int = -1
    fifos: dict[Stream, int] = field(default_factory=dict)  # stream -> read fd (non-blocking)
    registered: bool = False
    released: bool = False
    output: TokenBucket | None = None  # bytes read from its pipes
    paused: dict[str, asyncio.TimerHandle] = field(default_factory=dict)  # what -> resume


class CellSpawner:
    """Implements :class:`agent.core.cellops.Spawner`; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, paths: Paths, bus: EventBus,
                 on_exit: ExitCallback, *, log_bytes: int = 64 << 10,
                 spawn: Callable[[SpawnSpec], Spawned] = spawn_cell,
                 kill_wait: float = 5.0, limits: CellLimits = CellLimits(),
                 on_listener: ListenerCallback | None = None) -> None:
        self.loop = loop
        self.paths = paths
        self.bus = bus
        self.on_exit = on_exit
        self.log_bytes = log_bytes
        self._spawn = spawn
        self.kill_wait = kill_wait
        self._lock = threading.Lock()
        self._handles: dict[str, _Handle] = {}
        self._logs: dict[str, LogBuffer] = {}
        self._finished: collections.OrderedDict[str, LogBuffer] = collections.OrderedDict()
        self.limits = limits
        self.on_listener = on_listener
        self.paused = {"output": 0}  # times a cell was held back

    # -- queries (loop) --------------------------------------------------------------------

    def pid(self, cell: str) -> int | None:
        h = self._handles.get(cell)
        return h.pid if h is not None else None

    def logs(self, cell: str) -> LogBuffer | None:
        return self._logs.get(cell) or self._finished.get(cell)

    # -- the Spawner protocol (any thread) --------------------------------------------------

    def _fifo(self, cell: str, stream: str) -> Path:
        return self.paths.cell_run_dir(cell) / stream

    def _open_fifos(self, cell: str, *, create: bool
                    ) -> tuple[dict[Stream, int], dict[Stream, int]]:
        """(agent read ends, cell write ends); the latter only when ``create``."""
        ours: dict[Stream, int] = {}
        theirs: dict[Stream, int] = {}
        try:
            for stream in _STREAMS:
                path = self._fifo(cell, stream)
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkfifo(path, 0o600)
                if not stat.S_ISFIFO(os.lstat(path).st_mode):
                    raise KernelError("mkfifo", str(path), errno.EEXIST, "not a FIFO")
                ours[stream] = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                if create:
                    theirs[stream] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            for fd in (*ours.values(), *theirs.values()):
                os.close(fd)
            raise KernelError.from_oserror("open FIFO", str(exc.filename), exc) from exc
        except BaseException:
            for fd in (*ours.values(), *theirs.values()):
                os.close(fd)
            raise
        return ours, theirs

    def start(self, cell: str, spec: SpawnSpec) -> int:
        ours, theirs = self._open_fifos(cell, create=True)
        try:
            spawned = self._spawn(replace(spec, stdout=theirs["stdout"],
                                          stderr=theirs["stderr"]))
        except BaseException:
            for fd in ours.values():
                os.close(fd)
            raise
        finally:
            for fd in theirs.values():
                os.close(fd)
        h = _Handle(cell, spawned.pid, spawned.pidfd,
                    -1 if spawned.seccomp_fd is None else spawned.seccomp_fd, ours)
        with self._lock:
            old = self._handles.get(cell)
            self._handles[cell] = h
        if old is not None:
            self.loop.call_soon_threadsafe(self._release, old)
        self.loop.call_soon_threadsafe(self._register, h)
        return spawned.pid

    def stop(self, cell: str, pid: int | None) -> None:
        """SIGKILL pid 1 and reap it; the fds go on the loop.  Gone already is fine; a pid
        this spawner does not own is left to the caller's cgroup kill."""
        with self._lock:
            h = self._handles.get(cell)
            if h is None or (pid is not None and h.pid != pid) or h.released:
                return
            fd = os.dup(h.pidfd)
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            select.select([fd], [], [], self.kill_wait)
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
        finally:
            os.close(fd)
        if self._on_loop():
            self._release(h)
        else:
            self.loop.call_soon_threadsafe(self._release, h)

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    # -- loop side ---------------------------------------------------------------------------

    def adopt(self, cell: str, pid: int) -> None:
        """Take over a cell left running by a previous agentd (its seccomp listener, if a
        copy survived, is re-adopted by the ``on_listener`` hook's owner)."""
        pidfd = os.pidfd_open(pid)
        try:
            ours, _ = self._open_fifos(cell, create=False)
        except KernelError as exc:
            log.warning("cell %s: logs not re-attached: %s", cell, exc)
            ours = {}
        h = _Handle(cell, pid, pidfd, -1, ours)
        with self._lock:
            self._handles[cell] = h
        self._register(h)

    def signal(self, cell: str, sig: int) -> bool:
        """Send ``sig`` to pid 1; False if the cell has no live pid 1 here."""
        h = self._handles.get(cell)
        if h is None or h.released:
            return False
        try:
            signal.pidfd_send_signal(h.pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    def _buffer(self, cell: str) -> LogBuffer:
        buf = self._logs.get(cell)
        if buf is None:
            buf = self._finished.pop(cell, None) or LogBuffer(self.log_bytes)
            self._logs[cell] = buf
        return buf

    def _register(self, h: _Handle) -> None:
        if h.released or h.registered:
            return
        h.registered = True
        lim = self.limits
        h.output = TokenBucket(lim.output_rate, lim.output_burst)
        self.loop.add_reader(h.pidfd, self._on_pidfd, h)
        fd, h.listener = h.listener, -1  # the hook's owner has it from now on
        if self.on_listener is not None:
            self.on_listener(h.cell, fd if fd >= 0 else None, h.pid)
        elif fd >= 0:
            os.close(fd)
        self._read_output(h)

    def _read_output(self, h: _Handle) -> None:
        buf = self._buffer(h.cell)
        for stream, fd in h.fifos.items():
            self.loop.add_reader(fd, self._on_output, h, stream, buf)

    def _pause(self, h: _Handle, what: str, wait: float) -> None:
        """Stop serving ``what`` ("output") of ``h`` for ``wait`` seconds."""
        if what in h.paused or h.released:
            return
        for fd in h.fifos.values():
            self.loop.remove_reader(fd)
        self.paused[what] += 1
        h.paused[what] = self.loop.call_later(wait, self._resume, h, what)
        self.bus.emit("master", "throttled", cell=h.cell, severity="notice", what=what,
                      wait_ms=round(wait * 1000, 1))

    def _resume(self, h: _Handle, what: str) -> None:
        h.paused.pop(what, None)
        if not h.released:
            self._read_output(h)

    def _on_output(self, h: _Handle, stream: Stream, buf: LogBuffer) -> None:
        """One read per callback, metered: the loop serves every other fd in between,
        and a cell over its output rate is not read until its bucket refills (its pipe
        fills and its writes block)."""
        fd = h.fifos.get(stream)
        if fd is None:
            return
        n = self._read(fd, stream, buf, self.limits.read_size)
        if n < 0:  # EOF: every writer is gone
            buf.flush(stream)
            self.loop.remove_reader(fd)
            os.close(fd)
            del h.fifos[stream]
        elif n and h.output is not None:
            wait = h.output.take(self.loop.time(), n)
            if wait > 0:
                self._pause(h, "output", wait)

    @staticmethod
    def _read(fd: int, stream: Stream, buf: LogBuffer, size: int) -> int:
        """One non-blocking read into ``buf``: the bytes read, -1 at end of file."""
        try:
            data = os.read(fd, size)
        except BlockingIOError:
            return 0
        except OSError as exc:
            log.warning("read %s: %s", stream, exc)
            return -1
        if not data:
            return -1
        buf.feed(stream, data)
        return len(data)

    def _drain(self, fd: int, stream: Stream, buf: LogBuffer) -> None:
        """What is left in a pipe being closed: at most one pipe buffer's worth (the
        writers are gone or no longer read)."""
        for _ in range(16):
            if self._read(fd, stream, buf, self.limits.read_size) <= 0:
                return

    def _close_listener(self, h: _Handle) -> None:
        if h.listener >= 0:  # never handed over (not registered yet)
            os.close(h.listener)
            h.listener = -1

    def _on_pidfd(self, h: _Handle) -> None:
        try:
            res = os.waitid(os.P_PIDFD, h.pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:  # adopted (not our child) or already reaped by stop()
            res = None
        except OSError as exc:
            log.error("cell %s: waitid: %s", h.cell, exc)
            res = None
        self._release(h)
        self.on_exit(h.cell, h.pid, exit_of(res))

    def _release(self, h: _Handle) -> None:
        """Unregister and close everything of ``h`` (loop thread), keeping its output."""
        with self._lock:
            if h.released:
                return
            h.released = True
            if self._handles.get(h.cell) is h:
                del self._handles[h.cell]
            current = h.cell in self._handles
        for timer in h.paused.values():
            timer.cancel()
        paused_output = "output" in h.paused
        h.paused.clear()
        buf = self._logs.get(h.cell)
        for stream, fd in list(h.fifos.items()):
            if h.registered and not paused_output:
                self.loop.remove_reader(fd)
            if buf is not None:
                self._drain(fd, stream, buf)
                buf.flush(stream)
            os.close(fd)
        h.fifos.clear()
        if h.registered:
            self.loop.remove_reader(h.pidfd)
        os.close(h.pidfd)
        self._close_listener(h)
        if not current and buf is not None:  # no new run of this cell: keep its output aside
            self._finish_logs(h.cell)

    def _finish_logs(self, cell: str) -> None:
        buf = self._logs.pop(cell, None)
        if buf is None:
            return
        self._finished[cell] = buf
        self._finished.move_to_end(cell)
        while len(self._finished) > FINISHED_LOGS_KEPT:
            self._finished.popitem(last=False)

    def close(self) -> None:
        """agentd shuts down: drop every registration; the cells keep running."""
        for h in list(self._handles.values()):
            self._release(h)
