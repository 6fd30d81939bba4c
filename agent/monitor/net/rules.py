"""Channel 3's decisions: kernel records in, events out (pure; time passed in).

:class:`NetRules` turns what agent.monitor.net.wire parsed into the ``net`` events
(docs/channel3.md):

==============  ========  ===================================================================
kind            severity  from, and whose event it is
==============  ========  ===================================================================
``flow``        info      a conntrack NEW event between two cells' addresses: the cell of
                          the source.  Per (cell, peer, proto, port): the first at once,
                          then one every ``flow_window_s`` with the ``count`` in between
``flow-denied`` notice    a refused packet a log rule reported (host table ``agent:deny``,
                          a cell table ``agent:out`` / ``agent:in``): the sending cell;
                          aggregated like flows, per destination address and port
``l2-drop``     alert     a frame the bridge's rules dropped (``agent:l2:REASON:CELL``), or
                          a packet with a forged source the cell's own table dropped
                          (``agent:spoof``: reason ``ip``/``ip6``, ``at: cell``)
``scan``        alert     once per ``scan_window_s`` and cell, when its refused attempts
                          in the window reached ``scan_ports`` distinct ports or
                          ``scan_addrs`` distinct addresses; with the counts
==============  ========  ===================================================================

Counts of a scan are of the attempts the kernel reported: the log rules are
rate-limited (agent.core.netlog), so a fast scan is sampled and the true numbers can
be higher (``capped`` says a set hit its bound).  Memory is bounded: at most
``max_keys`` aggregated flows (the oldest is flushed first) and ``set_max`` members of
each scan set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.core.events import Severity
from agent.core.netlog import parse_prefix
from agent.monitor.net.wire import (
    AF_INET,
    ETH_P_ARP,
    CtNew,
    LogRecord,
    Packet,
    arp_sender,
    summarize,
)

__all__ = ["Directory", "NetEvent", "NetRules", "uid_attrs"]

HOOK_INPUT = 1
_VLAN_TYPES = (0x8100, 0x88A8, 0x9100)


class Directory(Protocol):
    """Who an address is (the cell address pool, as the agent leased it)."""

    def cell_of(self, address: str) -> str | None:
        """The cell holding ``address``, None for any other address."""

    def is_host(self, address: str) -> bool:
        """True for a gateway address of the cells' VLANs (the host itself)."""

    def uid_base(self, cell: str) -> int | None:
        """The host uid of the cell's uid 0 (None: no user namespace)."""


@dataclass(frozen=True)
class NetEvent:
    cell: str
    kind: str
    severity: Severity
    attrs: dict[str, Any]


@dataclass
class _Agg:
    due: float
    event: NetEvent
    pending: int = 0


@dataclass
class _Aggregator:
    """First event of a key at once; then the count of its repeats, once per window."""

    window: float
    max_keys: int
    keys: dict[tuple[Any, ...], _Agg] = field(default_factory=dict)

    def observe(self, key: tuple[Any, ...], event: NetEvent, now: float) -> list[NetEvent]:
        a = self.keys.get(key)
        if a is not None:
            a.pending += 1
            a.event = event
            return []
        out = [self._evict()] if len(self.keys) >= self.max_keys else []
        self.keys[key] = _Agg(now + self.window, event)
        return [e for e in out if e is not None] + [_with(event, count=1)]

    def _evict(self) -> NetEvent | None:
        key = next(iter(self.keys))
        a = self.keys.pop(key)
        return _with(a.event, count=a.pending, window_s=self.window) if a.pending else None

    def next_due(self) -> float | None:
        # keys are inserted in time order with the same window: the first is due first
        return next(iter(self.keys.values())).due if self.keys else None

    def due(self, now: float) -> list[NetEvent]:
        out: list[NetEvent] = []
        while self.keys:
            key, a = next(iter(self.keys.items()))
            if a.due > now:
                break
            del self.keys[key]
            if a.pending:  # still busy: report the count, keep aggregating
                out.append(_with(a.event, count=a.pending, window_s=self.window))
                self.keys[key] = _Agg(now + self.window, a.event)
        return out


def _with(e: NetEvent, **attrs: Any) -> NetEvent:
    return NetEvent(e.cell, e.kind, e.severity, {**e.attrs, **attrs})


@dataclass
class _ScanWindow:
    end: float
    ports: set[tuple[str, int]] = field(default_factory=set)
    addrs: set[str] = field(default_factory=set)
    attempts: int = 0
    capped: bool = False


@dataclass
class _ScanWatch:
    window: float
    ports: int
    addrs: int
    set_max: int
    cells: dict[str, _ScanWindow] = field(default_factory=dict)

    def observe(self, cell: str, pkt: Packet, now: float) -> None:
        w = self.cells.get(cell)
        if w is None:
            w = self.cells[cell] = _ScanWindow(now + self.window)
        w.attempts += 1
        if pkt.dport is not None and pkt.proto not in ("icmp", "icmpv6"):
            if len(w.ports) < self.set_max:
                w.ports.add((pkt.proto, pkt.dport))
            else:
                w.capped = True
        if len(w.addrs) < self.set_max:
            w.addrs.add(pkt.dst)
        else:
            w.capped = True

    def next_due(self) -> float | None:
        return next(iter(self.cells.values())).end if self.cells else None

    def due(self, now: float) -> list[NetEvent]:
        out: list[NetEvent] = []
        while self.cells:
            cell, w = next(iter(self.cells.items()))
            if w.end > now:
                break
            del self.cells[cell]
            if len(w.ports) >= self.ports or len(w.addrs) >= self.addrs:
                sample = sorted(w.ports)[:8]
                out.append(NetEvent(cell, "scan", "alert", {
                    "ports": len(w.ports), "addrs": len(w.addrs), "attempts": w.attempts,
                    "window_s": self.window, "capped": w.capped,
                    "sample": [f"{p}/{proto}" for proto, p in sample]}))
        return out


def uid_attrs(base: int | None, uid: int) -> dict[str, int]:
    """A host uid as an event says it: ``uid`` inside the cell whose uid 0 is host uid
    ``base``, else ``uid_host``."""
    if base is not None and base <= uid < base + 65536:
        return {"uid": uid - base}
    return {"uid_host": uid}


class NetRules:
    """Kernel records -> ``net`` events; :meth:`due` releases what waits on a window."""

    def __init__(self, directory: Directory, *, flow_window_s: float = 10.0,
                 scan_window_s: float = 10.0, scan_ports: int = 20, scan_addrs: int = 10,
                 max_keys: int = 4096, set_max: int = 1024) -> None:
        self.dir = directory
        self.flows = _Aggregator(flow_window_s, max_keys)
        self.denied = _Aggregator(flow_window_s, max_keys)
        self.scans = _ScanWatch(scan_window_s, scan_ports, scan_addrs, set_max)
        self.ignored = 0  # records that were not the agent's or named no known cell

    # -- conntrack ------------------------------------------------------------------------
    def conntrack(self, ev: CtNew, now: float) -> list[NetEvent]:
        cell, peer = self.dir.cell_of(ev.src), self.dir.cell_of(ev.dst)
        if cell is None or peer is None:  # the host's own connections into a cell
            self.ignored += 1
            return []
        proto = _PROTO_NAMES.get(ev.proto, str(ev.proto))
        e = NetEvent(cell, "flow", "info", {"proto": proto, "src": ev.src, "sport": ev.sport,
                                             "dst": ev.dst, "dport": ev.dport,
                                             "peer_cell": peer})
        return self.flows.observe((cell, peer, proto, ev.dport), e, now)

    # -- NFLOG ----------------------------------------------------------------------------
    def log(self, rec: LogRecord, now: float, netns_cell: str | None = None) -> list[NetEvent]:
        """``netns_cell``: the cell whose netns the record was read in (None: the host's)."""
        p = parse_prefix(rec.prefix)
        if p is None:
            self.ignored += 1
            return []
        if p.what == "l2":
            if netns_cell is not None:  # only the host's bridge table logs these
                self.ignored += 1
                return []
            return [NetEvent(p.cell, "l2-drop", "alert", _l2_attrs(rec, p.reason))]
        pkt = summarize(rec)
        if pkt is None:
            self.ignored += 1
            return []
        if p.what == "deny" and netns_cell is None:
            return self._denied(self.dir.cell_of(pkt.src), pkt, rec, "host", now)
        if netns_cell is None:
            self.ignored += 1
            return []
        if p.what == "spoof":
            reason = "ip" if rec.family == AF_INET else "ip6"
            return [NetEvent(netns_cell, "l2-drop", "alert", {
                "reason": reason, "at": "cell", "src": pkt.src, "dst": pkt.dst,
                "proto": pkt.proto, **self._uid(netns_cell, rec)})]
        if p.what == "out":
            return self._denied(netns_cell, pkt, rec, "cell", now)
        if p.what == "in":  # attributed to the sender; the receiver is the peer
            return self._denied(self.dir.cell_of(pkt.src), pkt, rec, "cell", now)
        self.ignored += 1
        return []

    def _uid(self, cell: str, rec: LogRecord) -> dict[str, int]:
        return {} if rec.uid is None else uid_attrs(self.dir.uid_base(cell), rec.uid)

    def _denied(self, cell: str | None, pkt: Packet, rec: LogRecord, at: str,
                now: float) -> list[NetEvent]:
        if cell is None:  # not from a cell (the outside world into a cell's table)
            self.ignored += 1
            return []
        peer = self.dir.cell_of(pkt.dst)
        to = "cell" if peer is not None else "host" if (
            self.dir.is_host(pkt.dst) or (at == "host" and rec.hook == HOOK_INPUT)) \
            else "outside"
        self.scans.observe(cell, pkt, now)
        e = NetEvent(cell, "flow-denied", "notice", {
            "proto": pkt.proto, "src": pkt.src, "sport": pkt.sport, "dst": pkt.dst,
            "dport": pkt.dport, "peer_cell": peer, "to": to, "at": at,
            **(self._uid(cell, rec) if at == "cell" and rec.hook != HOOK_INPUT else {})})
        return self.denied.observe((cell, pkt.proto, pkt.dst, pkt.dport), e, now)

    def feed_log(self, recs: Iterable[LogRecord], now: float,
                 netns_cell: str | None = None) -> list[NetEvent]:
        """:meth:`log` for a batch of records read at ``now``."""
        out: list[NetEvent] = []
        for r in recs:
            out += self.log(r, now, netns_cell)
        return out

    # -- windows ----------------------------------------------------------------------------
    def next_due(self) -> float | None:
        dues = [d for d in (self.flows.next_due(), self.denied.next_due(),
                            self.scans.next_due()) if d is not None]
        return min(dues) if dues else None

    def due(self, now: float) -> list[NetEvent]:
        return [*self.flows.due(now), *self.denied.due(now), *self.scans.due(now)]


_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 136: "udplite"}


def _l2_attrs(rec: LogRecord, reason: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {"reason": reason, "at": "bridge", "mac": rec.mac,
                             "ethertype": f"0x{rec.ethertype:04x}"}
    if rec.vlan is not None:
        attrs["vlan"] = rec.vlan
    if rec.ethertype in _VLAN_TYPES and len(rec.payload) >= 2:  # a second (inner) tag
        attrs["inner_vlan"] = int.from_bytes(rec.payload[0:2], "big") & 0x0FFF
    if rec.ethertype == ETH_P_ARP:
        sender = arp_sender(rec)
        if sender is not None:
            attrs["arp_mac"], attrs["arp_ip"] = sender
    else:
        pkt = summarize(rec)
        if pkt is not None:
            attrs.update(src=pkt.src, dst=pkt.dst, proto=pkt.proto)
            if pkt.sport is not None:
                attrs.update(sport=pkt.sport, dport=pkt.dport)
    return attrs
