"""The host channel on agentd's loop: every source registered with the loop, each change an
event of channel ``host`` (agent.monitor.host.rules decides what and whose).

Sources, each started on its own (one that fails is reported, ``master/monitor-failed``
{``monitor``: ``host:<source>``}, and the others go on):

* ``uevent``: the kernel's uevent socket, read :data:`SLICE` datagrams per wake-up;
* ``clock``: the cancel-on-set timerfd (agent.kernel.timerfd);
* ``mount``: the mount table's epoll fd; a change is read after :data:`MOUNT_SETTLE_S`,
  so a burst of mounts (a cell starting) costs one read of the table, not one per mount;
* ``rtnl``: the rtnetlink groups of agentd's netns (the host's), read in slices; the state
  is seeded by a dump in a worker thread (no events for what already exists) and dumped
  again after an overflow of the socket;
* ``sysctl``: the watched sysctls, read at start and again :data:`SYSCTL_SETTLE_S` after
  a hint (a trapped syscall, a module loaded or removed, a link added or removed), at most
  once per :data:`SYSCTL_MIN_INTERVAL_S`; sysctl writes have no event of their own.

Attribution: a raw bus sink on channel ``syscall`` feeds the allowed traps to the
:class:`~agent.monitor.host.rules.Attributor`; every change then asks it which cell, if
any, explains the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from agent.core.errors import AgentError, KernelError
from agent.core.events import Event, Severity
from agent.kernel.nlsock import McastSocket
from agent.kernel.timerfd import ClockWatch
from agent.monitor.host import adapter
from agent.monitor.host.rules import (
    WATCHED,
    Attributor,
    Change,
    Mount,
    NetState,
    attributed,
    mount_change,
    mount_changes,
    parse_mountinfo,
    parse_uevent,
    sysctl_change,
    sysctl_changes,
    uevent_change,
    uevent_hints_sysctls,
)

__all__ = ["Bus", "HostMonitor", "Sources"]

log = logging.getLogger(__name__)

SLICE = 32  # datagrams per wake-up
MOUNT_SETTLE_S = 0.05
SYSCTL_SETTLE_S = 0.05
SYSCTL_MIN_INTERVAL_S = 1.0  # a storm of hints (a cell trapping in a loop): one check/s


class Bus(Protocol):
    """What the service needs of the event bus (agent.daemon.bus.EventBus)."""

    def emit(self, channel: str, kind: str, *, cell: str | None = None,
             severity: Severity = "info", **attrs: Any) -> object: ...
    def add_sink(self, sink: Callable[[Event], None], *, raw: bool = ...,
                 channel: str | None = ..., name: str | None = ...) -> None: ...
    def remove_sink(self, sink: Callable[[Event], None]) -> None: ...


class Sources:
    """How each source is opened (tests replace some)."""

    uevents: Callable[[], McastSocket] = staticmethod(adapter.open_uevents)
    rtnl: Callable[[], McastSocket] = staticmethod(adapter.open_rtnl)
    rtnl_dump: Callable[[], list[adapter.NetMsg]] = staticmethod(adapter.dump_rtnl)
    clock: Callable[[], ClockWatch] = ClockWatch
    mounts: Callable[[], adapter.MountTable] = adapter.MountTable


class HostMonitor:
    def __init__(self, bus: Bus, *, bridge: str, own_mounts: Iterable[str],
                 proc: Path = Path("/proc"), sysctls: Iterable[str] | None = None,
                 sources: Sources | None = None,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.own_mounts = tuple(own_mounts)
        self.proc = proc
        self.sysctl_names = tuple(w.name for w in WATCHED) if sysctls is None else tuple(sysctls)
        self.sources = sources or Sources()
        self.mono = mono
        self.attributor = Attributor()
        self.net = NetState(bridge)
        self.rtnl_parse = adapter.RtnlParser()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.uevents: McastSocket | None = None
        self.rtnl: McastSocket | None = None
        self.clock: ClockWatch | None = None
        self.mount_table: adapter.MountTable | None = None
        self.mounts: dict[int, Mount] = {}
        self.sysctls: dict[str, str | None] = {}
        self.problems: dict[str, str] = {}
        self.counts = {"uevent": 0, "clock-set": 0, "mount": 0, "link": 0, "address": 0,
                       "route": 0, "sysctl": 0, "attributed": 0, "hints": 0,
                       "sysctl_checks": 0, "mount_reads": 0, "overruns": 0}
        self._mount_timer: asyncio.TimerHandle | None = None
        self._sysctl_timer: asyncio.TimerHandle | None = None
        self._fds: list[int] = []
        self._resyncing = False
        self._last_check = float("-inf")

    # -- start and stop --------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.bus.add_sink(self.on_event, raw=True, channel="syscall", name="host-monitor")
        self.sysctls = await asyncio.to_thread(adapter.read_sysctls, self.sysctl_names,
                                               self.proc)
        self._try("uevent", self._start_uevents)
        self._try("clock", self._start_clock)
        self._try("mount", self._start_mounts)
        await self._start_rtnl()
        log.info("host monitor: %s", ", ".join(
            f"{k} {'off: ' + v if v else 'on'}" for k, v in self.status()["sources"].items()))

    def _try(self, source: str, fn: Callable[[], None]) -> bool:
        try:
            fn()
            return True
        except (AgentError, OSError) as exc:
            self._failed(source, exc)
            return False

    def _failed(self, source: str, exc: BaseException) -> None:
        self.problems[source] = str(exc)
        log.error("host monitor: %s: %s", source, exc)
        self.bus.emit("master", "monitor-failed", severity="notice", monitor=f"host:{source}",
                      error=str(exc), hint=exc.hint if isinstance(exc, AgentError) else None)

    def _watch(self, fd: int, cb: Callable[[], None]) -> None:
        assert self.loop is not None
        self.loop.add_reader(fd, cb)
        self._fds.append(fd)

    def _start_uevents(self) -> None:
        self.uevents = self.sources.uevents()
        self._watch(self.uevents.fileno(), self._on_uevents)

    def _start_clock(self) -> None:
        self.clock = self.sources.clock()
        self._watch(self.clock.fileno(), self._on_clock)

    def _start_mounts(self) -> None:
        self.mount_table = self.sources.mounts()
        self.mounts = parse_mountinfo(self.mount_table.read())
        self._watch(self.mount_table.fileno(), self._on_mount_notice)

    async def _start_rtnl(self) -> None:
        try:
            self.rtnl = self.sources.rtnl()  # first: what changes during the dump is read
            for m in await asyncio.to_thread(self.sources.rtnl_dump):
                self._net(m)
        except (AgentError, OSError) as exc:
            self._failed("rtnl", exc)
            if self.rtnl is not None:
                self.rtnl.close()
                self.rtnl = None
            return
        self._watch(self.rtnl.fileno(), self._on_rtnl)

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.bus.remove_sink(self.on_event)
        if self.loop is not None:
            for fd in self._fds:
                with contextlib.suppress(ValueError, OSError):
                    self.loop.remove_reader(fd)
        self._fds.clear()
        for timer in (self._mount_timer, self._sysctl_timer):
            if timer is not None:
                timer.cancel()
        for thing in (self.uevents, self.rtnl, self.clock, self.mount_table):
            if thing is not None:
                thing.close()

    def status(self) -> dict[str, Any]:
        sources = {"uevent": self.uevents, "clock": self.clock, "mount": self.mount_table,
                   "rtnl": self.rtnl}
        return {"sources": {k: (None if v is not None else self.problems.get(k, "off"))
                            for k, v in sources.items()},
                "lost": sum(s.lost for s in (self.uevents, self.rtnl) if s is not None),
                "sysctls": dict(self.sysctls), **self.counts,
                "rtnl_undecoded": self.rtnl_parse.bad}

    # -- publishing ------------------------------------------------------------------------

    def _emit(self, change: Change) -> None:
        cell = None if change.own else self.attributor.who(change, self.mono())
        if cell is not None:
            self.counts["attributed"] += 1
        cell, severity, attrs = attributed(change, cell)
        self.counts[change.kind] = self.counts.get(change.kind, 0) + 1
        self.bus.emit("host", change.kind, cell=cell, severity=severity, **attrs)

    def on_event(self, ev: Event) -> None:
        """Raw sink of channel ``syscall``: remember allowed traps; any trap is a hint."""
        if ev.kind != "trap":
            return
        self.attributor.trap(ev.cell, ev.attrs.get("op"), ev.attrs.get("verdict"),
                             ev.mono or self.mono())
        self.hint()

    # -- sources ---------------------------------------------------------------------------

    def _read(self, sock: McastSocket, source: str) -> list[bytes]:
        try:
            got = sock.read(SLICE)
        except KernelError as exc:
            self._failed(source, exc)
            self._unwatch(sock)
            return []
        if got.overrun:
            self.counts["overruns"] += 1
            self.bus.emit("host", "lost", severity="notice", source=source, overruns=sock.lost)
            if source == "rtnl":
                self._resync()
        return got.datagrams

    def _unwatch(self, sock: McastSocket) -> None:
        if self.loop is not None and not sock.closed:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(sock.fileno())
        sock.close()
        if sock is self.uevents:
            self.uevents = None
        if sock is self.rtnl:
            self.rtnl = None

    def _on_uevents(self) -> None:
        if self.uevents is None:
            return
        for data in self._read(self.uevents, "uevent"):
            u = parse_uevent(data)
            if u is None:
                continue
            self._emit(uevent_change(u))
            if uevent_hints_sysctls(u):
                self.hint()

    def _on_clock(self) -> None:
        if self.clock is None:
            return
        try:
            delta = self.clock.check()
        except KernelError as exc:
            self._failed("clock", exc)
            return
        if delta is not None:
            self._emit(Change("clock-set", {"delta_s": round(delta, 3)}, "notice"))

    def _on_mount_notice(self) -> None:
        if self.mount_table is None or self.loop is None:
            return
        self.mount_table.ep.poll(0)  # drained now: the loop stops waking for this change
        if self._mount_timer is None:
            self._mount_timer = self.loop.call_later(MOUNT_SETTLE_S, self._read_mounts)

    def _read_mounts(self) -> None:
        self._mount_timer = None
        if self.mount_table is None:
            return
        try:
            new = parse_mountinfo(self.mount_table.read())
        except KernelError as exc:
            self._failed("mount", exc)
            return
        self.counts["mount_reads"] += 1
        old, self.mounts = self.mounts, new
        for action, m in mount_changes(old, new):
            self._emit(mount_change(action, m, self.own_mounts))

    def _on_rtnl(self) -> None:
        if self.rtnl is None:
            return
        for data in self._read(self.rtnl, "rtnl"):
            for m in self.rtnl_parse(data):
                for change in self._net(m):
                    self._emit(change)
                    if change.kind == "link" and change.attrs.get("action") in ("add",
                                                                                 "remove"):
                        self.hint()

    def _net(self, m: adapter.NetMsg) -> list[Change]:
        if m.kind == "link":
            return self.net.link(m.new, *m.args)
        if m.kind == "address":
            return self.net.address(m.new, *m.args)
        return self.net.route(m.new, *m.args)

    def _resync(self) -> None:
        """After an overflow: dump again; what differs from the state is reported."""
        if self._resyncing or self.loop is None:
            return
        self._resyncing = True
        task = self.loop.create_task(asyncio.to_thread(self.sources.rtnl_dump))
        task.add_done_callback(self._resynced)

    def _resynced(self, task: asyncio.Future[list[adapter.NetMsg]]) -> None:
        self._resyncing = False
        if task.cancelled() or task.exception() is not None:
            log.error("host monitor: rtnetlink dump failed: %s",
                      None if task.cancelled() else task.exception())
            return
        dumped = task.result()
        fresh = NetState(self.net.bridge)
        for m in dumped:
            fresh_changes = (fresh.link if m.kind == "link" else
                             fresh.address if m.kind == "address" else fresh.route)
            fresh_changes(True, *m.args)
        # what disappeared while messages were lost
        for index, link in list(self.net.links.items()):
            if index not in fresh.links:
                for c in self.net.link(False, index, link.name, link.up, link.master):
                    self._emit(c)
        for key in list(self.net.addrs - fresh.addrs):
            for c in self.net.address(False, *key):
                self._emit(c)
        for rkey in list(self.net.routes - fresh.routes):
            for c in self.net.route(False, *rkey):
                self._emit(c)
        for m in dumped:  # what appeared or changed
            for c in self._net(m):
                self._emit(c)

    # -- sysctls ---------------------------------------------------------------------------

    def hint(self) -> None:
        """Something may have changed a sysctl: read them again shortly (one read for a
        burst of hints)."""
        self.counts["hints"] += 1
        if self._sysctl_timer is None and self.loop is not None:
            delay = max(SYSCTL_SETTLE_S,
                        self._last_check + SYSCTL_MIN_INTERVAL_S - self.loop.time())
            self._sysctl_timer = self.loop.call_later(delay, self.check_sysctls)

    def check_sysctls(self) -> None:
        self._sysctl_timer = None
        if self.loop is not None:
            self._last_check = self.loop.time()
        self.counts["sysctl_checks"] += 1
        new = adapter.read_sysctls(self.sysctl_names, self.proc)
        old, self.sysctls = self.sysctls, new
        for name, before, after in sysctl_changes(old, new):
            self._emit(sysctl_change(name, before, after))
