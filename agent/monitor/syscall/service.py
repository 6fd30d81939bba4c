"""Channel 2 on agentd's loop: the seccomp listeners of every cell, their answers and
their events.

The spawner hands each cell's listener over through :meth:`SyscallService.on_listener`
(``fd`` None for a cell adopted after a restart: its listener comes back from the keeper,
:mod:`agent.monitor.syscall.adapter_keeper`, or across exec via :meth:`readopt`).  For
every notification, one per loop callback so no cell holds the loop:

* ``killed`` (a foreign ABI): the process is killed (SIGKILL through a pidfd opened
  before the notification id is re-checked), ``syscall/killed``;
* ``denied``: refused with EPERM (EAFNOSUPPORT for a socket family), ``syscall/denied``;
* ``trap``: decided by :mod:`agent.monitor.syscall.ops` from the cell's granted
  operations and copies of its arguments; when allowed the master performs it
  (:mod:`.adapter`, :mod:`.adapter_mount` in a worker thread), ``syscall/trap``.

Each cell has a token bucket (:class:`TrapLimits`): over it, its listener is not read for
a while, so its trapped threads wait in the kernel and no other cell waits
(``master/throttled`` with ``what=traps``).  Allowed calls never reach the master.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.core import syscalls as abi
from agent.core.errors import KernelError
from agent.core.events import Severity
from agent.core.ratelimit import TokenBucket
from agent.kernel import seccomp as notify
from agent.monitor.syscall import adapter, adapter_mount, ops
from agent.monitor.syscall.adapter_keeper import KeeperLink
from agent.monitor.syscall.rules import Trapped, attrs, classify, deny_errno, severity

__all__ = ["Emitter", "Granted", "ListenerHook", "SyscallService", "TrapLimits"]

log = logging.getLogger(__name__)

ListenerHook = Callable[[str, "int | None", int], None]
Granted = Callable[[str], "frozenset[str] | None"]  # None: not known yet (agentd starting)


class Emitter(Protocol):
    """What the service needs of the event bus (agent.daemon.bus.EventBus)."""

    def emit(self, channel: str, kind: str, *, cell: str | None = None,
             severity: Severity = "info", **attrs: Any) -> object: ...


@dataclass(frozen=True)
class TrapLimits:
    # Notifications answered per second and cell: what one cell may cost the loop.  A
    # cell's privileged operations are rare (an NTP client's adjtimex, a mount).  On the
    # emulated box, loaded, a notification costs agentd ~25 ms of CPU (bench/run
    # syscall), so 10/s is a quarter of the loop at worst; on an A53 board about 1 %.
    rate: float = 10.0
    burst: float = 50.0
    undecided_s: float = 30.0  # how long a trap waits for the cell's grants at start
    retry_s: float = 0.1


@dataclass(eq=False)
class _Listener:
    cell: str
    pid: int  # the cell's pid 1 on the host
    fd: int
    bucket: TokenBucket
    reading: bool = False
    paused: asyncio.TimerHandle | None = None
    busy: bool = False  # a notification is being decided (waiting, or in a worker)
    mounts: set[int] = field(default_factory=set)  # ids of the USB mounts made for it


class SyscallService:
    def __init__(self, bus: Emitter, granted: Granted, *, reboot: Callable[[str], None],
                 keeper: KeeperLink | None = None, limits: TrapLimits = TrapLimits(),
                 host: adapter.HostOps | None = None,
                 proc: Path = Path("/proc"), sys_root: Path = Path("/sys"),
                 dev_root: Path = Path("/dev"), arch: str = abi.HOST_ARCH) -> None:
        self.bus = bus
        self.granted = granted
        self.reboot = reboot
        self.keeper = keeper
        self.limits = limits
        self.host = host or adapter.HostOps()
        self.proc, self.sys_root, self.dev_root, self.arch = proc, sys_root, dev_root, arch
        self.loop: asyncio.AbstractEventLoop | None = None
        self.cells: dict[str, _Listener] = {}
        self.counts = {"trap": 0, "denied": 0, "killed": 0, "throttled": 0, "lost": 0}
        self.rebooting = False
        self._keeper_wait = 1.0
        self._keeper_restarting = False

    # -- hand-over -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind to the loop; take back the listeners the keeper held for the previous
        agentd (before the cells are adopted)."""
        self.loop = asyncio.get_running_loop()
        if self.keeper is None:
            return
        try:
            kept = await asyncio.to_thread(self._open_keeper)
        except OSError as exc:
            log.error("listener keeper not available: %s", exc)
            return
        for cell, pid, fd in kept:
            self.readopt(cell, pid, fd)
        self._watch_keeper()

    def _open_keeper(self) -> list[tuple[str, int, int]]:
        assert self.keeper is not None
        return self.keeper.take_all() if self.keeper.open() else []

    def on_listener(self, cell: str, fd: int | None, pid: int) -> None:
        """The spawner's hook (loop thread): the listener of a new pid 1, or None for an
        adopted one (its listener came back from the keeper or across exec, or is lost)."""
        if fd is None:
            have = self.cells.get(cell)
            if have is None or have.pid != pid:
                self.counts["lost"] += 1
                self.bus.emit("master", "listener-lost", cell=cell, severity="notice", pid=pid,
                              why="no copy survived agentd (trapped calls fail ENOSYS)")
            return
        self._add(cell, pid, fd)
        if self.keeper is not None and not self.keeper.put(cell, pid, fd):
            self._keeper_died()

    def readopt(self, cell: str, pid: int, fd: int) -> None:
        """Take a listener back (from the keeper, or passed across exec by a respawn)."""
        if notify.listener_dead(fd):
            os.close(fd)
            if self.keeper is not None:
                self.keeper.drop(cell, pid)
            return
        self._add(cell, pid, fd)

    def kept_fds(self) -> list[tuple[str, int, int]]:
        """(cell, pid 1, listener fd) of every cell: what a re-exec must pass on (the
        fds are not close-on-exec'd here; the caller clears FD_CLOEXEC on them)."""
        return [(c.cell, c.pid, c.fd) for c in self.cells.values()]

    def _add(self, cell: str, pid: int, fd: int) -> None:
        old = self.cells.pop(cell, None)
        if old is not None:
            self._close(old)
        c = _Listener(cell, pid, fd, TokenBucket(self.limits.rate, self.limits.burst))
        self.cells[cell] = c
        self._read(c)

    # -- the keeper ------------------------------------------------------------------------

    def _watch_keeper(self) -> None:
        if self.loop is not None and self.keeper is not None and self.keeper.fileno() >= 0:
            self.loop.add_reader(self.keeper.fileno(), self._on_keeper)

    def _on_keeper(self) -> None:
        if self.keeper is not None and self.keeper.dead():
            self._keeper_died()

    def _keeper_died(self) -> None:
        """Start a new keeper and hand it every listener again (backing off; one
        restart at a time)."""
        if self.keeper is None or self.loop is None or self._keeper_restarting:
            return
        self._keeper_restarting = True
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.keeper.fileno())
        self.keeper.close()
        self.keeper.reap()
        wait, self._keeper_wait = self._keeper_wait, min(self._keeper_wait * 2, 60.0)
        self.bus.emit("master", "keeper-lost", severity="notice", retry_s=wait)
        self.loop.call_later(wait, self._restart_keeper)

    def _restart_keeper(self) -> None:
        assert self.keeper is not None and self.loop is not None
        task = self.loop.create_task(asyncio.to_thread(self.keeper.open))
        task.add_done_callback(self._keeper_opened)

    def _keeper_opened(self, task: asyncio.Future[bool]) -> None:
        assert self.keeper is not None
        self._keeper_restarting = False
        if task.exception() is not None:
            log.error("listener keeper not restarted: %s", task.exception())
            self._keeper_died()
            return
        if all(self.keeper.put(c.cell, c.pid, c.fd) for c in self.cells.values()):
            self._keeper_wait = 1.0
            self._watch_keeper()
        else:
            self._keeper_died()

    # -- reading ---------------------------------------------------------------------------

    def _read(self, c: _Listener) -> None:
        if self.loop is None or c.reading or c.busy or c.paused is not None or c.fd < 0:
            return
        c.reading = True
        self.loop.add_reader(c.fd, self._on_readable, c)

    def _unread(self, c: _Listener) -> None:
        if c.reading and self.loop is not None:
            self.loop.remove_reader(c.fd)
            c.reading = False

    def _close(self, c: _Listener) -> None:
        self._unread(c)
        if c.paused is not None:
            c.paused.cancel()
            c.paused = None
        if c.fd >= 0:
            os.close(c.fd)
            c.fd = -1

    def _forget(self, c: _Listener) -> None:
        if self.cells.get(c.cell) is c:
            del self.cells[c.cell]
        self._close(c)
        if self.keeper is not None:
            self.keeper.drop(c.cell, c.pid)

    def _on_readable(self, c: _Listener) -> None:
        if c.busy:
            return
        try:
            if notify.listener_dead(c.fd):
                self._forget(c)
                return
            n = notify.recv_notif(c.fd)
        except KernelError as exc:
            log.error("cell %s: seccomp listener: %s", c.cell, exc)
            self._forget(c)
            return
        if n is None:
            return
        t = classify(self.arch, n.arch, n.nr, n.args)
        self.counts[t.kind] += 1
        c.busy = True  # until answered: its reader goes if the answer has to wait
        self._decide(c, n, t, 0.0)

    def _hold(self, c: _Listener) -> None:
        """The answer to ``c``'s notification waits (for the cell's grants, or for a
        worker thread): read nothing more of ``c`` meanwhile."""
        self._unread(c)

    def _done(self, c: _Listener) -> None:
        """A notification answered: meter the cell, read on (now or after its wait)."""
        c.busy = False
        if c.fd < 0 or self.loop is None:
            return
        wait = c.bucket.take(self.loop.time())
        if wait > 0:
            self._unread(c)
            self.counts["throttled"] += 1
            c.paused = self.loop.call_later(wait, self._resume, c)
            self.bus.emit("master", "throttled", cell=c.cell, severity="notice", what="traps",
                          wait_ms=round(wait * 1000, 1))
        self._read(c)

    def _resume(self, c: _Listener) -> None:
        c.paused = None
        self._read(c)

    # -- deciding --------------------------------------------------------------------------

    def _answer(self, c: _Listener, n: notify.Notif, t: Trapped, verdict: str,
                proc: dict[str, Any], error: int = 0, val: int = 0, **extra: Any) -> None:
        if c.fd >= 0:
            try:
                notify.send_resp(c.fd, n.id, error=error, val=val)
            except KernelError as exc:
                log.error("cell %s: answer to %s: %s", c.cell, t.name, exc)
        err = errno.errorcode.get(error) if error else None
        self.bus.emit("syscall", t.kind, cell=c.cell, severity=severity(t.kind),
                      **attrs(t, verdict, proc, error=err, **extra))
        self._done(c)

    def _decide(self, c: _Listener, n: notify.Notif, t: Trapped, waited: float) -> None:
        proc = adapter.proc_attrs(n.pid, self.proc)
        if t.kind == "killed":
            adapter.kill_trapped(c.fd, n.id, n.pid, self.proc)
            return self._answer(c, n, t, "killed", proc, errno.ENOSYS)
        if t.kind == "denied":
            return self._answer(c, n, t, "denied", proc, deny_errno(t.name))
        granted = self.granted(c.cell)
        if granted is None and waited < self.limits.undecided_s and self.loop is not None:
            self._hold(c)
            step = self.limits.retry_s
            self.loop.call_later(step, self._decide, c, n, t, waited + step)
            return None
        plan = ops.plan(t, granted or frozenset())
        if isinstance(plan, ops.Decision):
            return self._finish(c, n, t, proc, plan, None)
        extra = ("root", "ns/mnt", "ns/user") if t.name in ("mount", "umount2") else ()
        mem = adapter.CellMemory(c.fd, n.id, n.pid, self.proc)
        try:
            mem.open(*extra)
            copied = mem.copy(plan, t.args)
        except (adapter.Gone, OSError) as exc:
            mem.close()
            log.info("cell %s: %s: process gone: %s", c.cell, t.name, exc)
            return self._done(c)
        if isinstance(copied, int):
            mem.close()
            return self._finish(c, n, t, proc, ops.Decision.no(copied, "bad pointer"), None)
        self._finish(c, n, t, proc, ops.decide(t, copied), mem)

    def _finish(self, c: _Listener, n: notify.Notif, t: Trapped, proc: dict[str, Any],
                d: ops.Decision, mem: adapter.CellMemory | None) -> None:
        act = d.action
        if d.verdict != "allowed" or act is None:
            if mem is not None:
                mem.close()
            return self._answer(c, n, t, d.verdict, proc, d.error, reason=d.reason)
        if isinstance(act, ops.MountUsb | ops.Umount):
            assert mem is not None and self.loop is not None
            self._hold(c)
            task = self.loop.create_task(asyncio.to_thread(self._mount_op, c, act, mem, n))
            task.add_done_callback(lambda f: self._mounted(c, n, t, proc, act, mem, f))
            return None
        err, val, extra = self._perform(act, mem, t)
        if mem is not None:
            mem.close()
        self._answer(c, n, t, "allowed", proc, err, val, **extra)
        if isinstance(act, ops.Reboot) and not err and not self.rebooting:
            self.rebooting = True
            self.reboot(act.how)
        return None

    def _perform(self, act: ops.Action, mem: adapter.CellMemory | None, t: Trapped
                 ) -> tuple[int, int, dict[str, Any]]:  # fmt: skip
        if isinstance(act, ops.SetHostname):
            return self.host.set_hostname(act.name, act.domain), 0, {"name": act.name}
        if isinstance(act, ops.SetClock):
            err, delta = self.host.set_clock(act.ns)
            return err, 0, {"delta_s": delta}
        if isinstance(act, ops.AdjTime):
            assert mem is not None
            err, val, out = self.host.adjtime(act.timex)
            if not err and not mem.write(t.args[act.arg], out):
                err = errno.EFAULT
            return err, val, {}
        if isinstance(act, ops.Reboot):
            return 0, 0, {"how": act.how}
        return errno.EPERM, 0, {}

    def _mount_op(self, c: _Listener, act: ops.MountUsb | ops.Umount,
                  mem: adapter.CellMemory, n: notify.Notif) -> int:  # worker thread
        root, mntns = mem.fds["root"], mem.fds["ns/mnt"]
        if isinstance(act, ops.Umount):
            return adapter_mount.detach(act, root, mntns, set(c.mounts))
        node = adapter_mount.usb_node(act.device, self.sys_root, self.dev_root)
        ids = adapter.host_ids(n.pid, act.uid, act.gid, self.proc)
        return adapter_mount.attach_usb(act, node, root, mntns, mem.fds["ns/user"], ids)

    def _mounted(self, c: _Listener, n: notify.Notif, t: Trapped, proc: dict[str, Any],
                 act: ops.MountUsb | ops.Umount, mem: adapter.CellMemory,
                 fut: asyncio.Future[int]) -> None:  # fmt: skip
        mem.close()
        extra: dict[str, Any] = {"target": act.target}
        if isinstance(act, ops.MountUsb):
            extra.update(device=act.device, fstype=act.fstype)
        exc = fut.exception()
        if isinstance(exc, ops.Refused):
            return self._answer(c, n, t, "denied", proc, exc.err, reason=exc.reason, **extra)
        if exc is not None:
            err = exc.errno if isinstance(exc, KernelError | OSError) and exc.errno else errno.EIO
            log.error("cell %s: %s: %s", c.cell, t.name, exc)
            return self._answer(c, n, t, "allowed", proc, err, reason=str(exc), **extra)
        mid = fut.result()
        if isinstance(act, ops.MountUsb):
            c.mounts.add(mid)
        else:
            c.mounts.discard(mid)
        return self._answer(c, n, t, "allowed", proc, **extra)

    # -- status and shutdown ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {"listeners": len(self.cells), **self.counts,
                "keeper": None if self.keeper is None else self.keeper.fileno() >= 0}

    async def close(self) -> None:
        """agentd stops: its copies go; the keeper's stay, so cells keep waiting for the
        next agentd instead of getting ENOSYS."""
        for c in list(self.cells.values()):
            self._close(c)
        self.cells.clear()
        if self.keeper is not None:
            if self.loop is not None:
                with contextlib.suppress(ValueError, OSError):
                    self.loop.remove_reader(self.keeper.fileno())
            self.keeper.close()
