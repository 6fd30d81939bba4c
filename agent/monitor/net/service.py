"""Channel 3's service: conntrack and NFLOG sockets on agentd's loop, ``net`` events out.

:class:`NetMonitor` holds, registered with the loop (``add_reader``):

* the host's conntrack NEW events between cell addresses (allowed flows between cells:
  only connections the host's rules let through are ever confirmed);
* the host's NFLOG group (agent.core.netlog): the bridge's layer-2 drops and the
  forwarding table's refusals;
* one NFLOG socket in each cell's netns whose table is in place (the cell's own
  refusals and spoofing attempts).  A new cell's socket is opened by the create plan's
  thread as soon as its table is applied, before its service starts
  (:meth:`NetMonitor.cell_table_applied`, a listener of
  :class:`agent.kernel.nft.FirewallSync`), so its first packets are reported too; the
  lifecycle events (a sink on the bus's ``lifecycle`` channel) trigger a re-sync that
  opens what is missing (cells adopted at start) and closes the sockets of cells gone.

Each callback reads at most :data:`MAX_DATAGRAMS` datagrams (a conntrack event, or an
NFLOG batch of up to 16 packets), so a busy kernel cannot hold the loop; the rest waits
for the next turn.  :class:`agent.monitor.net.rules.NetRules` decides; events go to the
bus (which also limits and coalesces per cell and kind).  A socket that fails is closed,
logged, published as ``net/monitor-failed`` (alert) and opened again after
:data:`RETRY_S`; a receive-buffer overrun is ``net/monitor-lost`` (notice).  Nothing
here raises into the loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError
from agent.core.events import Event
from agent.core.netlog import LOG_GROUP
from agent.kernel.nft import FirewallSync
from agent.monitor.net.cells import CellNet, Cells, Directory, ManagerCells
from agent.monitor.net.listeners import POLL_S, ListenWatch
from agent.monitor.net.rules import NetEvent, NetRules
from agent.monitor.net.service_sources import KernelOpener, Opener, Readable, Stats, _Source
from agent.monitor.net.wire import iter_messages, parse_ct_new, parse_log

__all__ = ["CellNet", "ManagerCells", "NetMonitor", "Opener"]

log = logging.getLogger(__name__)

CHANNEL = "net"
MAX_DATAGRAMS = 16
RETRY_S = 30.0
# A gone cell's log socket is read this much longer: more than the kernel's batch timeout
# for NFLOG (wire.nflog_bind_requests: 0.1 s), so the drops of its last moments arrive.
RETIRE_S = 1.0


class NetMonitor:
    """See the module doc.  ``start`` once the cells are known; ``close`` at shutdown."""

    def __init__(self, bus: Any, pool: IPv4Network, *, group: int = LOG_GROUP,
                 opener: Opener | None = None, clock: Callable[[], float] = time.monotonic,
                 **rules: Any) -> None:
        self.bus = bus
        self.pool = pool
        self.group = group
        self.opener: Opener = opener or KernelOpener()
        self.clock = clock
        self.rules_kw = rules
        self.rules = NetRules(Directory([]), **rules)
        self.stats = Stats()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.cells: Cells | None = None
        self._host: dict[str, _Source] = {}  # "ct", "log"
        self._cell: dict[str, _Source] = {}
        self._retired: set[_Source] = set()  # cells gone: read a little longer
        self._failed: dict[str, str] = {}  # socket -> last error
        self._timer: asyncio.TimerHandle | None = None
        self._retry: dict[str, asyncio.TimerHandle] = {}
        self._sync_task: asyncio.Task[None] | None = None
        self._resync = False
        self._closed = False
        self._sink = self._on_lifecycle  # one bound method: the bus removes sinks by identity
        self._firewall: FirewallSync | None = None
        self.listening = ListenWatch()
        self._poll: asyncio.TimerHandle | None = None
        self._opening: set[asyncio.Task[None]] = set()  # sock_diag sockets being made

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop, cells: Cells,
              firewall: FirewallSync | None = None) -> None:
        """Open the host's sockets and the cells'; with ``firewall``, new cells' sockets
        are opened by their create plan (see the module doc)."""
        self.loop, self.cells = loop, cells
        self.rules.dir = Directory(cells.net_cells())
        if firewall is not None:
            firewall.on_cell_table.append(self.cell_table_applied)
            self._firewall = firewall
        self._open_host("ct")
        self._open_host("log")
        self.bus.add_sink(self._sink, all_events=True, channel="lifecycle",
                          name="net-monitor")
        self._schedule_sync()
        self._poll = loop.call_later(POLL_S, self._on_poll)

    async def aclose(self) -> None:
        self.close()
        if self._sync_task is not None:
            await asyncio.gather(self._sync_task, return_exceptions=True)

    def close(self) -> None:
        self._closed = True
        self.bus.remove_sink(self._sink)
        if self._firewall is not None and self.cell_table_applied in \
                self._firewall.on_cell_table:
            self._firewall.on_cell_table.remove(self.cell_table_applied)
        for h in [self._timer, self._poll, *self._retry.values()]:
            if h is not None:
                h.cancel()
        self._timer = None
        self._retry.clear()
        for src in [*self._host.values(), *self._cell.values(), *self._retired]:
            self._remove(src)
        self._host.clear()
        self._cell.clear()
        self._retired.clear()

    def status(self) -> dict[str, Any]:
        return {"sockets": sorted(s.sock.what for s in [*self._host.values(),
                                                        *self._cell.values()]),
                "failed": dict(self._failed), "events": dict(self.stats.events),
                "lost": self.stats.lost, "ignored": self.rules.ignored,
                "errors": self.stats.errors}

    # ------------------------------------------------------------------ sockets
    def _open_host(self, kind: str) -> None:
        self._retry.pop(kind, None)
        if self._closed:
            return
        try:
            sock = (self.opener.conntrack(self.pool) if kind == "ct"
                    else self.opener.nflog(self.group, None))
        except (AgentError, OSError) as exc:
            self._failure(kind, None, exc)
            self._retry_later(kind, lambda: self._open_host(kind))
            return
        self._add(_Source(kind, sock))

    def _retry_later(self, key: str, fn: Callable[[], None]) -> None:
        if self.loop is not None and not self._closed and key not in self._retry:
            self._retry[key] = self.loop.call_later(RETRY_S, fn)

    def _add(self, src: _Source) -> None:
        assert self.loop is not None
        (self._host if src.cell is None else self._cell)[src.cell or src.kind] = src
        self._failed.pop(f"cell:{src.cell}" if src.cell else src.kind, None)
        self.loop.add_reader(src.sock.fileno(), self._on_readable, src)
        if src.cell is not None and src.diag is None:
            self._reopen_diag(src)  # its listeners: opened off the create plan's path

    def _remove(self, src: _Source) -> None:
        if self.loop is not None:
            try:
                self.loop.remove_reader(src.sock.fileno())
            except (ValueError, OSError):
                pass  # already closed
        src.sock.close()
        self._close_diag(src)

    def _close_diag(self, src: _Source) -> None:
        if src.diag is not None:
            src.diag.close()
            src.diag = None
        if src.cell is not None:
            self.listening.forget(src.cell)

    def _failure(self, what: str, cell: str | None, exc: BaseException) -> None:
        self.stats.failures += 1
        self._failed[f"cell:{cell}" if cell else what] = str(exc)
        log.error("net monitor: %s: %s", what, exc)
        self._emit(NetEvent(cell or "", "monitor-failed", "alert",
                            {"socket": what, "error": str(exc)}))

    # ------------------------------------------------------------------ reading
    def _on_readable(self, src: _Source) -> None:
        try:
            dgrams = src.sock.read(MAX_DATAGRAMS)
        except (AgentError, OSError) as exc:
            self._drop_failed(src, exc)
            return
        now = self.clock()
        events: list[NetEvent] = []
        try:
            for d in dgrams:
                for _, _, msg in iter_messages(d):
                    if src.kind == "ct":
                        ct = parse_ct_new(msg)
                        if ct is not None:
                            events += self._listened(self.rules.conntrack(ct, now))
                    else:
                        rec = parse_log(msg)
                        if rec is not None:
                            events += self.rules.log(rec, now, src.cell)
        except Exception:  # a bug in a decision must not stop the channel
            self.stats.errors += 1
            log.exception("net monitor: reading %s", src.sock.what)
        if src.sock.lost != src.lost_seen:
            n, src.lost_seen = src.sock.lost - src.lost_seen, src.sock.lost
            self.stats.lost += n
            events.append(NetEvent(src.cell or "", "monitor-lost", "notice",
                                   {"socket": src.sock.what, "overruns": n}))
        self._publish(events)
        self._arm()

    def _drop_failed(self, src: _Source, exc: BaseException) -> None:
        self._remove(src)
        if src in self._retired:  # its cell is gone: nothing to retry
            self._retired.discard(src)
            return
        if src.cell is None:
            self._host.pop(src.kind, None)
            self._failure(src.kind, None, exc)
            self._retry_later(src.kind, lambda: self._open_host(src.kind))
        else:
            self._cell.pop(src.cell, None)
            self._failure(src.sock.what, src.cell, exc)
            self._retry_later(f"cell:{src.cell}", lambda: self._retry_cell(src.cell or ""))

    def _retry_cell(self, cell: str) -> None:
        self._retry.pop(f"cell:{cell}", None)
        self._schedule_sync()

    def _publish(self, events: list[NetEvent]) -> None:
        for e in events:
            self._emit(e)

    def _emit(self, e: NetEvent) -> None:
        self.stats.events[e.kind] = self.stats.events.get(e.kind, 0) + 1
        try:
            self.bus.emit(CHANNEL, e.kind, cell=e.cell or None, severity=e.severity, **e.attrs)
        except Exception:
            self.stats.errors += 1
            log.exception("net monitor: publishing %s", e.kind)

    # ------------------------------------------------------------------ listeners
    def _listened(self, events: list[NetEvent]) -> list[NetEvent]:
        """``events``, each TCP flow to a port its cell was not yet seen listening on
        preceded by a fresh look at that cell's listeners (their ``listen`` events)."""
        out: list[NetEvent] = []
        for e in events:
            peer, port = e.attrs.get("peer_cell"), e.attrs.get("dport")
            if e.kind == "flow" and e.attrs.get("proto") == "tcp" and \
                    isinstance(peer, str) and isinstance(port, int) and \
                    not self.listening.knows(peer, "tcp", port) and peer in self._cell:
                out += self._listeners_of(self._cell[peer])
            out.append(e)
        return out

    def _listeners_of(self, src: _Source) -> list[NetEvent]:
        if src.diag is None or src.cell is None:
            return []
        try:
            found, whole = src.diag.listeners()
        except (AgentError, OSError) as exc:
            what = src.diag.what
            self._close_diag(src)
            self._failure(what, src.cell, exc)
            self._retry_later(f"diag:{src.cell}", functools.partial(self._reopen_diag, src))
            return []
        return self.listening.seen(src.cell, found, whole, self.rules.dir.uid_base(src.cell))

    def _on_poll(self) -> None:
        self._poll = None
        events: list[NetEvent] = []
        for src in list(self._cell.values()):
            try:
                events += self._listeners_of(src)
            except Exception:  # a bug must not stop the channel
                self.stats.errors += 1
                log.exception("net monitor: listeners of %s", src.cell)
        self._publish(events)
        if self.loop is not None and not self._closed:
            self._poll = self.loop.call_later(POLL_S, self._on_poll)

    def _reopen_diag(self, src: _Source) -> None:
        self._retry.pop(f"diag:{src.cell}", None)
        if self.loop is None or self._closed or self._cell.get(src.cell or "") is not src \
                or src.netns is None:
            return
        netns = src.netns

        async def reopen() -> None:
            try:
                diag = await asyncio.to_thread(self.opener.diag, netns)
            except (AgentError, OSError) as exc:
                self._failure(f"sock_diag in {netns}", src.cell, exc)
                self._retry_later(f"diag:{src.cell}", functools.partial(self._reopen_diag, src))
                return
            if self._closed or self._cell.get(src.cell or "") is not src or src.diag:
                diag.close()
                return
            src.diag = diag
            self._failed.pop(f"cell:{src.cell}", None)  # (its log socket is fine: it is here)

        task = self.loop.create_task(reopen())
        self._opening.add(task)  # (the loop keeps only a weak reference to a task)
        task.add_done_callback(self._opening.discard)

    # ------------------------------------------------------------------ windows
    def _arm(self) -> None:
        if self.loop is None or self._closed:
            return
        due = self.rules.next_due()
        if due is None:
            return
        if self._timer is not None:
            if self._timer.when() <= self.loop.time() + max(0.0, due - self.clock()):
                return
            self._timer.cancel()
        self._timer = self.loop.call_later(max(0.0, due - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        try:
            self._publish(self.rules.due(self.clock()))
        except Exception:
            self.stats.errors += 1
            log.exception("net monitor: closing windows")
        self._arm()

    # ------------------------------------------------------------------ cells
    def cell_table_applied(self, cell: str, netns: Path) -> None:
        """A create plan applied ``cell``'s table (called in the plan's thread, before
        the service starts): open its log socket here and hand it to the loop."""
        loop = self.loop
        if loop is None or self._closed or cell in self._cell:
            return
        try:
            sock = self.opener.nflog(self.group, netns)
        except (AgentError, OSError) as exc:
            loop.call_soon_threadsafe(self._failure, f"nflog group {self.group} in {netns}",
                                      cell, exc)
            return
        loop.call_soon_threadsafe(self._adopt, cell, netns, sock)

    def _adopt(self, cell: str, netns: Path, sock: Readable) -> None:
        if self._closed or cell in self._cell:
            sock.close()
            return
        self._add(_Source("log", sock, cell, netns))

    def _is_closed(self) -> bool:
        return self._closed  # (read again after an await: close() may have run meanwhile)

    def _retire(self, src: _Source) -> None:
        """A cell's netns is going: its log socket is still read for :data:`RETIRE_S`
        (the kernel sends what it logged in batches, up to the batch timeout later: the
        last drops of a cell that ended at once), then closed."""
        src.uid_base = self.rules.dir.uid_base(src.cell) if src.cell else None
        self._close_diag(src)
        if self.loop is None:
            self._remove(src)
            return
        self._retired.add(src)
        self.loop.call_later(RETIRE_S, self._end_retired, src)

    def _end_retired(self, src: _Source) -> None:
        if src in self._retired:
            self._retired.discard(src)
            self._remove(src)

    def _on_lifecycle(self, event: Event) -> None:
        self._schedule_sync()

    def _schedule_sync(self) -> None:
        if self.loop is None or self._closed:
            return
        if self._sync_task is not None and not self._sync_task.done():
            self._resync = True
            return
        self._sync_task = self.loop.create_task(self._sync())

    async def _sync(self) -> None:
        """Open the log sockets of cells whose table is in place, close the others'."""
        assert self.cells is not None
        while not self._closed:
            self._resync = False
            try:
                cells = self.cells.net_cells()
            except Exception:
                self.stats.errors += 1
                log.exception("net monitor: listing cells")
                return
            keep = {c.name: c.netns for c in cells if c.netns is not None}
            for name, src in list(self._cell.items()):
                if keep.get(name) != src.netns:
                    del self._cell[name]
                    self._retire(src)
            self.rules.dir = Directory(cells, {s.cell: s.uid_base for s in self._retired
                                                if s.cell is not None})
            want = {c.name: c.netns for c in cells if c.table and c.netns is not None}
            for name, path in want.items():
                if name in self._cell or path is None or f"cell:{name}" in self._retry:
                    continue
                try:
                    sock = await asyncio.to_thread(self.opener.nflog, self.group, path)
                except (AgentError, OSError) as exc:
                    self._failure(f"nflog group {self.group} in {path}", name, exc)
                    self._retry_later(f"cell:{name}", functools.partial(self._retry_cell, name))
                    continue
                if self._is_closed():
                    sock.close()
                    return
                self._add(_Source("log", sock, name, path))
            if not self._resync:
                return
