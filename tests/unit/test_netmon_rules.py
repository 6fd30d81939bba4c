"""agent.monitor.net.rules: attribution, aggregation of flows and refusals, scans."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from test_netmon_wire import ipv4

from agent.core import netlog
from agent.monitor.net import wire
from agent.monitor.net.rules import NetEvent, NetRules

CELLS = {"10.77.0.2": "web", "10.77.1.2": "client", "10.77.2.2": "other"}
HOSTS = {"10.77.0.1", "10.77.1.1", "10.77.2.1"}


@dataclass
class Dir:
    cells: dict[str, str] = field(default_factory=lambda: dict(CELLS))

    def cell_of(self, address: str) -> str | None:
        return self.cells.get(address)

    def is_host(self, address: str) -> bool:
        return address in HOSTS

    def uid_base(self, cell: str) -> int | None:
        return 100_000 if cell == "client" else None


def tcp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIHHHH", sport, dport, 0, 0, 0x5002, 0, 0, 0)


def rec(prefix: str, payload: bytes, *, family: int = wire.AF_INET, hook: int = 3,
        ethertype: int = 0x0800, mac: str | None = None, uid: int | None = None,
        vlan: int | None = None) -> wire.LogRecord:
    return wire.LogRecord(family, hook, prefix, ethertype, None, None, mac, uid, None, vlan,
                          payload)


def ct(src: str, dst: str, dport: int = 8080, sport: int = 40000) -> wire.CtNew:
    return wire.CtNew(wire.AF_INET, 6, src, dst, sport, dport)


def kinds(evs: list[NetEvent]) -> list[tuple[str, str]]:
    return [(e.cell, e.kind) for e in evs]


def test_flows_first_at_once_then_counted_per_window() -> None:
    r = NetRules(Dir(), flow_window_s=10)
    (e,) = r.conntrack(ct("10.77.1.2", "10.77.0.2"), 0.0)
    assert (e.cell, e.kind, e.severity) == ("client", "flow", "info")
    assert e.attrs == {"proto": "tcp", "src": "10.77.1.2", "sport": 40000, "dst": "10.77.0.2",
                       "dport": 8080, "peer_cell": "web", "count": 1}
    # a busy client: 500 more connections in the window are one event when it closes
    for i in range(500):
        assert r.conntrack(ct("10.77.1.2", "10.77.0.2", sport=40001 + i), 1.0 + i / 100) == []
    assert r.next_due() == 10.0
    assert r.due(9.9) == []
    (s,) = r.due(10.0)
    assert s.attrs["count"] == 500 and s.attrs["window_s"] == 10 and s.attrs["sport"] == 40500
    # still busy in the next window: one more summary; idle: the key goes
    r.conntrack(ct("10.77.1.2", "10.77.0.2"), 12.0)
    assert [x.attrs["count"] for x in r.due(20.0)] == [1]
    assert r.due(30.0) == [] and r.next_due() is None
    # another port is another pair
    assert kinds(r.conntrack(ct("10.77.1.2", "10.77.0.2", dport=9000), 31.0)) == [
        ("client", "flow")]


def test_flows_not_between_cells_are_ignored() -> None:
    r = NetRules(Dir())
    assert r.conntrack(ct("10.77.0.1", "10.77.0.2"), 0) == []  # the host into a cell
    assert r.conntrack(ct("10.77.1.2", "10.77.9.9"), 0) == []  # no cell there
    assert r.ignored == 2


def test_keys_are_bounded_and_evicted_with_their_counts() -> None:
    r = NetRules(Dir(), max_keys=2)
    r.conntrack(ct("10.77.1.2", "10.77.0.2", dport=1), 0)
    r.conntrack(ct("10.77.1.2", "10.77.0.2", dport=1), 0.5)
    r.conntrack(ct("10.77.1.2", "10.77.0.2", dport=2), 1)
    out = r.conntrack(ct("10.77.1.2", "10.77.0.2", dport=3), 2)
    assert [(e.attrs["dport"], e.attrs["count"]) for e in out] == [(1, 1), (3, 1)]
    assert len(r.flows.keys) == 2


def test_denied_attribution_everywhere() -> None:
    r = NetRules(Dir())
    syn = ipv4("10.77.1.2", "10.77.0.2", 6, tcp(40000, 8081))
    # host table, routed: the source's cell
    (e,) = r.log(rec("agent:deny", syn, hook=2), 0)
    assert (e.cell, e.kind, e.severity) == ("client", "flow-denied", "notice")
    assert (e.attrs["peer_cell"], e.attrs["to"], e.attrs["at"]) == ("web", "cell", "host")
    # the host itself (input hook) and outside
    (h,) = r.log(rec("agent:deny", ipv4("10.77.2.2", "10.77.2.1", 6, tcp(1, 22)), hook=1), 0)
    assert (h.cell, h.attrs["to"], h.attrs["peer_cell"]) == ("other", "host", None)
    (o,) = r.log(rec("agent:deny", ipv4("10.77.2.2", "8.8.8.8", 17, tcp(1, 53)), hook=2), 0)
    assert (o.cell, o.attrs["to"]) == ("other", "outside")
    # a cell's own output chain: that cell, with the uid in the cell
    # (the same attempt again is aggregated, whichever table saw it: another port here)
    syn = ipv4("10.77.1.2", "10.77.0.2", 6, tcp(40000, 8082))
    (c,) = r.log(rec("agent:out", syn, uid=101_000), 0, netns_cell="client")
    assert (c.cell, c.attrs["at"], c.attrs["uid"]) == ("client", "cell", 1000)
    # its input chain: the sender (by source), the netns's cell is the peer
    syn = ipv4("10.77.1.2", "10.77.0.2", 6, tcp(40000, 8083))
    (i,) = r.log(rec("agent:in", syn, hook=1), 0, netns_cell="web")
    assert (i.cell, i.attrs["peer_cell"], i.attrs["at"]) == ("client", "web", "cell")
    # from nowhere we know: no event (the outside world, not a cell's doing)
    assert r.log(rec("agent:in", ipv4("192.168.1.9", "10.77.0.2", 6, tcp(1, 80)), hook=1), 0,
                 netns_cell="web") == []
    # a cell-table prefix read in the host's netns (or the reverse) is not believed
    assert r.log(rec("agent:out", syn), 0) == []
    assert r.log(rec("agent:deny", syn), 0, netns_cell="web") == []
    assert r.log(rec("agent:l2:mac:web", syn), 0, netns_cell="web") == []
    assert r.log(rec("ulogd: something", syn), 0) == []


def test_retransmissions_are_one_refusal() -> None:
    r = NetRules(Dir(), flow_window_s=10)
    syn = ipv4("10.77.1.2", "10.77.0.2", 6, tcp(40000, 8081))
    evs = [e for t in (0, 1, 3, 7) for e in r.log(rec("agent:deny", syn, hook=2), t)]
    assert len(evs) == 1
    assert [e.attrs["count"] for e in r.due(10)] == [3]


def test_spoofed_sources_are_l2_drops_of_the_cell() -> None:
    r = NetRules(Dir())
    forged = ipv4("10.77.0.2", "10.77.0.9", 17, tcp(1, 2))
    (e,) = r.log(rec("agent:spoof", forged, uid=100_000), 0, netns_cell="client")
    assert (e.cell, e.kind, e.severity) == ("client", "l2-drop", "alert")
    assert e.attrs["reason"] == "ip" and e.attrs["at"] == "cell" and e.attrs["uid"] == 0
    v6 = (struct.pack("!IHBB", 6 << 28, 8, 17, 64) + bytes.fromhex("20010db8" + "0" * 23 + "1")
          + bytes.fromhex("fe80" + "0" * 27 + "1") + struct.pack("!HHHH", 1, 2, 8, 0))
    (e6,) = r.log(rec("agent:spoof", v6, family=wire.AF_INET6, ethertype=0x86DD), 0,
                  netns_cell="client")
    assert e6.attrs["reason"] == "ip6" and e6.attrs["src"] == "2001:db8::1"


def test_layer2_drops_name_the_cell_of_the_rule() -> None:
    r = NetRules(Dir())
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + bytes.fromhex("02aabbccddee") + \
        bytes([10, 77, 0, 1]) + b"\0" * 6 + bytes([10, 77, 0, 2])
    (e,) = r.log(rec(netlog.l2_prefix("arp", "other"), arp, family=wire.AF_BRIDGE, hook=0,
                     ethertype=0x0806, mac="02:aa:bb:cc:dd:ee"), 0)
    assert (e.cell, e.kind, e.severity) == ("other", "l2-drop", "alert")
    assert e.attrs == {"reason": "arp", "at": "bridge", "mac": "02:aa:bb:cc:dd:ee",
                       "ethertype": "0x0806", "arp_mac": "02:aa:bb:cc:dd:ee",
                       "arp_ip": "10.77.0.1"}
    (v,) = r.log(rec(netlog.l2_prefix("vlan", "other"), b"\x00\x66\x08\x00", hook=0,
                     family=wire.AF_BRIDGE, ethertype=0x8100, vlan=101), 0)
    assert (v.attrs["vlan"], v.attrs["inner_vlan"]) == (101, 0x66)
    # a cell that is not (or no longer) in the pool is still named: the rule names it
    (g,) = r.log(rec(netlog.l2_prefix("mac", "gone"), b"", family=wire.AF_BRIDGE), 0)
    assert g.cell == "gone"


def _attempt(r: NetRules, dst: str, port: int, t: float) -> list[NetEvent]:
    return r.log(rec("agent:out", ipv4("10.77.2.2", dst, 6, tcp(40000, port))), t,
                 netns_cell="other")


def test_port_scan_reported_once_per_window_with_counts() -> None:
    r = NetRules(Dir(), scan_window_s=10, scan_ports=20, scan_addrs=10)
    for i, port in enumerate(range(1, 101)):
        _attempt(r, "10.77.0.2", port, i * 0.05)
    out = [e for e in r.due(10.0) if e.kind == "scan"]
    assert len(out) == 1
    (s,) = out
    assert (s.cell, s.severity) == ("other", "alert")
    assert (s.attrs["ports"], s.attrs["addrs"], s.attrs["attempts"]) == (100, 1, 100)
    assert s.attrs["window_s"] == 10 and s.attrs["sample"][:2] == ["1/tcp", "2/tcp"]
    assert [e for e in r.due(30.0) if e.kind == "scan"] == []  # reported once


def test_address_sweep_and_quiet_cells() -> None:
    r = NetRules(Dir(), scan_window_s=10, scan_ports=20, scan_addrs=10)
    for i in range(12):
        _attempt(r, f"10.77.{i}.9", 80, i)
    (s,) = [e for e in r.due(10) if e.kind == "scan"]
    assert (s.attrs["ports"], s.attrs["addrs"]) == (1, 12)
    # the control: a misconfigured client retrying one undeclared peer is no scan
    for i in range(200):
        _attempt(r, "10.77.0.2", 8081, 20 + i * 0.04)
    assert [e for e in r.due(40) if e.kind == "scan"] == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 5), st.floats(0, 100)),
                max_size=300))
def test_scan_counts_are_exact_within_bounds(attempts: list[tuple[int, int, float]]) -> None:
    """Every window reports exactly the distinct ports and addresses it saw, and only
    when a threshold is reached."""
    r = NetRules(Dir(), scan_window_s=10, scan_ports=8, scan_addrs=3)
    windows: list[tuple[float, set[int], set[str]]] = []
    reported = []
    for port, host, t in sorted(attempts, key=lambda a: a[2]):
        reported += [e for e in r.due(t) if e.kind == "scan"]
        if not windows or t >= windows[-1][0] + 10:
            windows.append((t, set(), set()))
        windows[-1][1].add(port)
        windows[-1][2].add(f"10.77.0.{host + 2}")
        _attempt(r, f"10.77.0.{host + 2}", port, t)
    reported += [e for e in r.due(1000) if e.kind == "scan"]
    want = [(len(p), len(a)) for _, p, a in windows if len(p) >= 8 or len(a) >= 3]
    assert [(e.attrs["ports"], e.attrs["addrs"]) for e in reported] == want
