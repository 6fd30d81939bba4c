"""Channel 3 against the host's real kernel, in namespaces of our own.

* Layer 2: a "router" netns with a bridge (the host kernel has no VLAN filtering, so one
  subnet) whose ports are two cells' veths (``vc-<hash>``, eth0 with the agent's MAC);
  the agent's ``bridge agent_l2`` table and an NFLOG socket in the router's netns.  Each
  abuse from tests/guest/netattack.py (root in the cell's netns, packet sockets) must be
  dropped and reported as ``l2-drop`` with its reason and cell, and its control (the
  cell's own ARP, IPv4 and IPv6) must pass.
* Routed: tests/privileged/test_nft_host.py's topology (two cells on two gateways), the
  host table, a conntrack socket and NFLOG sockets in the router's and in a cell's
  netns: an allowed connection is a ``flow``, a refused one a ``flow-denied`` (at the
  host, and at the cell when its own table refuses), a forged source an ``l2-drop`` at
  the cell, a port scan one ``scan``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from test_nft_host import BR, CLIENT, NETNS, WEB, connect, sh, topo  # noqa: F401 (fixture)

from agent.core import firewall as fw
from agent.core import l2fw, netlog
from agent.core.firewall import CellFw
from agent.core.names import cell_link_local, cell_mac, veth_names
from agent.kernel.nft import Nft
from agent.monitor.net import adapter, wire
from agent.monitor.net.rules import NetEvent, NetRules

ATTACK = Path(__file__).resolve().parents[1] / "guest" / "netattack.py"
POOL = IPv4Network("10.77.0.0/16")


class Dir:
    def __init__(self, cells: list[CellFw]) -> None:
        self.by_addr = {c.address: c.name for c in cells}
        self.gws = {c.gateway for c in cells if c.gateway}

    def cell_of(self, address: str) -> str | None:
        return self.by_addr.get(address)

    def is_host(self, address: str) -> bool:
        return address in self.gws

    def uid_base(self, cell: str) -> int | None:
        return None


def collect(socks: list[tuple[adapter.NfSocket, str | None]], rules: NetRules,
            wait: float = 1.0, until: int = 0) -> list[NetEvent]:
    """Read the sockets for ``wait`` seconds (or until ``until`` events) into events."""
    out: list[NetEvent] = []
    end = time.monotonic() + wait
    while time.monotonic() < end and (not until or len(out) < until):
        for s, cell in socks:
            for d in s.read(64):
                for _, _, m in wire.iter_messages(d):
                    ct = wire.parse_ct_new(m)
                    if ct is not None:
                        out += rules.conntrack(ct, time.monotonic())
                    rec = wire.parse_log(m)
                    if rec is not None:
                        out += rules.log(rec, time.monotonic(), cell)
        time.sleep(0.05)
    return out


LISTEN = """
import socket, sys, select
fam = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", 9))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(2048)
    print(addr[0].split("%")[0], data.decode(errors="replace"), flush=True)
"""


class Listener:
    """UDP port 9 in a netns; :meth:`got` returns the sources heard so far."""

    def __init__(self, ns: str, family: str) -> None:
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", LISTEN,
                                   family], stdout=subprocess.PIPE, text=True)
        assert self.p.stdout is not None and self.p.stdout.readline().strip() == "ready"
        import os
        os.set_blocking(self.p.stdout.fileno(), False)
        self.lines: list[str] = []

    def got(self, wait: float = 0.5) -> list[str]:
        time.sleep(wait)
        assert self.p.stdout is not None
        while True:
            line = self.p.stdout.readline()
            if not line:
                break
            self.lines.append(line.split()[0])
        return self.lines

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


@pytest.fixture
def l2() -> Iterator[dict[str, Any]]:
    tag = uuid.uuid4().hex[:6]
    router = f"nmr-{tag}"
    cells = {"a": (f"nma-{tag}", "10.77.0.2"), "b": (f"nmb-{tag}", "10.77.0.3")}
    made = []
    try:
        for ns in (router, *(n for n, _ in cells.values())):
            sh("ip", "netns", "add", ns)
            made.append(ns)
        # no duplicate address detection: a tentative gateway would not answer at once
        sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
           "net.ipv6.conf.default.accept_dad=0")
        sh("ip", "-n", router, "link", "add", "nmbr", "type", "bridge")
        sh("ip", "-n", router, "addr", "add", "10.77.0.1/24", "dev", "nmbr")
        sh("ip", "-n", router, "link", "set", "nmbr", "up")
        for name, (ns, addr) in cells.items():
            port = veth_names(name)[0]
            sh("ip", "-n", router, "link", "add", port, "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0")
            sh("ip", "-n", ns, "link", "set", "eth0", "address", cell_mac(name))
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", router, "link", "set", port, "master", "nmbr", "up")
        time.sleep(0.5)
        info = sh("ip", "-n", router, "-o", "link", "show", "nmbr").split()
        gwmac = info[info.index("link/ether") + 1]
        gwll = next(w.split("/")[0] for w in sh("ip", "-n", router, "-6", "-o", "addr", "show",
                                                 "dev", "nmbr").split() if w.startswith("fe80"))
        fws = [CellFw(n, 100, a, gateway="10.77.0.1") for n, (_, a) in cells.items()]
        Nft().apply(l2fw.l2_ruleset(fws), NETNS / router)
        log = adapter.open_nflog(netlog.LOG_GROUP, NETNS / router)
        try:
            yield {"router": router, "cells": cells, "gwmac": gwmac, "gwll": gwll, "log": log,
                   "rules": NetRules(Dir(fws))}
        finally:
            log.close()
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def attack(l2: dict[str, Any], cell: str, *kinds: str, peer: str = "b") -> None:
    ns, addr = l2["cells"][cell]
    out = sh("ip", "netns", "exec", ns, sys.executable, str(ATTACK), "--mac", cell_mac(cell),
             "--ip", addr, "--ll", cell_link_local(cell), "--gw", "10.77.0.1",
             "--gwmac", l2["gwmac"], "--gwll", l2["gwll"], "--peer-ip", l2["cells"][peer][1],
             "--peer-mac", cell_mac(peer), *kinds)
    assert [w for w in out.split() if w not in ("sent", "refused")] == list(kinds), out


def test_own_frames_pass_the_bridge(l2: dict[str, Any]) -> None:
    """The controls: without them every attack test could pass on a broken probe."""
    v4, v6 = Listener(l2["router"], "4"), Listener(l2["router"], "6")
    try:
        attack(l2, "a", "own-arp", "own-ip")
        assert "10.77.0.2" in v4.got()
        neigh = sh("ip", "-n", l2["router"], "neigh", "show", "10.77.0.2")
        assert cell_mac("a") in neigh, neigh
        # the cell's own IPv6: the kernel resolves the gateway's link-local (neighbour
        # discovery from the cell's link-local) and the datagram arrives
        ns = l2["cells"]["a"][0]
        sh("ip", "netns", "exec", ns, sys.executable, "-c",
           "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
           f"s.sendto(b'own', ('{l2['gwll']}', 9, 0, socket.if_nametoindex('eth0')))")
        assert cell_link_local("a") in v6.got(1.0)
    finally:
        v4.close()
        v6.close()
    assert collect([(l2["log"], None)], l2["rules"], wait=0.5) == []


ABUSE = [("mac", "mac"), ("arp-ip", "arp"), ("arp-mac", "arp"), ("vlan", "vlan"),
         ("qinq", "vlan"), ("dhcp", "dhcp"), ("ra", "ra"), ("ip", "ip"), ("ip6", "ip6"),
         ("ip6-unspec", "ip6"), ("ipx", "proto"), ("stp", "proto"), ("rawip", "ip"),
         ("freebind6", "ip6")]


@pytest.mark.parametrize(("kind", "reason"), ABUSE, ids=[k for k, _ in ABUSE])
def test_abuse_is_dropped_and_reported(l2: dict[str, Any], kind: str, reason: str) -> None:
    v4, v6 = Listener(l2["router"], "4"), Listener(l2["router"], "6")
    try:
        attack(l2, "a", kind)
        evs = collect([(l2["log"], None)], l2["rules"], wait=1.0, until=1)
        assert [(e.cell, e.kind, e.attrs["reason"], e.attrs["at"]) for e in evs] == [
            ("a", "l2-drop", reason, "bridge")], evs
        assert evs[0].severity == "alert"
        heard = v4.got(0.2) + v6.got(0.2)
        assert heard == [], heard  # nothing of it reached the host
        if kind == "arp-ip":  # the gateway did not learn b's address at a's MAC
            assert cell_mac("a") not in sh("ip", "-n", l2["router"], "neigh", "show",
                                           "10.77.0.3")
        # the control right after: a's own traffic still passes
        attack(l2, "a", "own-ip")
        assert "10.77.0.2" in v4.got()
    finally:
        v4.close()
        v6.close()


def test_reports_are_rate_limited_in_the_kernel(l2: dict[str, Any]) -> None:
    """500 spoofed frames: all dropped, at most the limit's burst (plus the rate over the
    time it took) reported, so agentd is not woken per packet."""
    t0 = time.monotonic()
    attack_n(l2, "mac", 500)
    took = time.monotonic() - t0
    evs = collect([(l2["log"], None)], l2["rules"], wait=1.0)
    limit = netlog.BURST + netlog.RATE * (took + 1.5)
    assert netlog.BURST <= len(evs) <= limit, (len(evs), took)
    table = Nft().list_table(l2fw.L2_TABLE, NETNS / l2["router"], l2fw.FAMILY)
    assert table is not None
    dropped = [int(e["counter"]["packets"]) for i in table["nftables"] if "rule" in i
               for e in i["rule"]["expr"] if "counter" in e
               and i["rule"].get("comment") == "drop mac" and i["rule"]["chain"].endswith("_a_mac")]
    assert dropped == [500]


def attack_n(l2: dict[str, Any], kind: str, n: int) -> None:
    ns, addr = l2["cells"]["a"]
    sh("ip", "netns", "exec", ns, sys.executable, str(ATTACK), "--mac", cell_mac("a"), "--ip",
       addr, "--ll", cell_link_local("a"), "--gw", "10.77.0.1", "--count", str(n), kind)


# -- routed: flows, refusals, scans ----------------------------------------------------------


def test_flows_refusals_spoofs_and_scans(topo: dict[str, Any]) -> None:  # noqa: F811
    r, c = NETNS / topo["router"], NETNS / topo["client"]
    nft = Nft()
    web = CellFw("web", 100, "10.77.0.2", gateway="10.77.0.1")
    client = CellFw("client", 101, "10.77.1.2", peers=CLIENT.peers, gateway="10.77.1.1")
    nft.apply(fw.host_ruleset([web, client], BR), r)
    rules = NetRules(Dir([web, client]), scan_window_s=3.0, scan_ports=20)
    ct = adapter.open_conntrack(POOL, r)
    hlog = adapter.open_nflog(netlog.LOG_GROUP, r)
    socks = [(ct, None), (hlog, None)]
    try:
        # allowed: one flow event, the client's, naming the peer
        assert connect(topo["client"], web.address, 8080) == "ok hello"
        evs = collect(socks, rules, until=1)
        assert [(e.cell, e.kind, e.attrs["peer_cell"], e.attrs["dport"]) for e in evs] == [
            ("client", "flow", "web", 8080)]
        # the host itself into a cell is no flow between cells
        assert connect(topo["router"], web.address, 8080) == "ok hello"
        assert collect(socks, rules, wait=0.5) == []
        # refused by the host table: the sender's flow-denied
        assert connect(topo["client"], web.address, 8081).startswith("fail")
        evs = collect(socks, rules, until=1)
        assert [(e.cell, e.kind, e.attrs["to"], e.attrs["at"], e.attrs["dport"])
                for e in evs] == [("client", "flow-denied", "cell", "host", 8081)]
        # a port scan: many refusals, one scan event once the window closes
        scan = ("import socket\nfor p in range(2000, 2060):\n    s = socket.socket()\n"
                "    s.setblocking(False)\n    s.connect_ex(('10.77.0.2', p))\n")
        sh("ip", "netns", "exec", topo["client"], sys.executable, "-c", scan)
        collect(socks, rules, wait=1.0)
        time.sleep(3.0)
        scans = [e for e in rules.due(time.monotonic()) if e.kind == "scan"]
        assert [(e.cell, e.severity) for e in scans] == [("client", "alert")]
        assert scans[0].attrs["ports"] >= 20 and scans[0].attrs["addrs"] == 1
        # the cell's own table: its refusal and its spoofing, read in its netns
        nft.apply(fw.cell_ruleset(client, [web, client]), c)
        clog = adapter.open_nflog(netlog.LOG_GROUP, c)
        socks.append((clog, "client"))
        try:
            assert connect(topo["client"], web.address, 8082).startswith("fail")
            evs = collect(socks, rules, until=1)
            assert [(e.cell, e.kind, e.attrs["at"], e.attrs["dport"]) for e in evs] == [
                ("client", "flow-denied", "cell", 8082)]
            sh("ip", "netns", "exec", topo["client"], sys.executable, str(ATTACK), "--mac",
               cell_mac("client"), "--ip", client.address, "--ll", cell_link_local("client"),
               "--gw", "10.77.1.1", "--peer-ip", "10.77.0.2", "rawip")
            evs = collect(socks, rules, until=1)
            assert [(e.cell, e.kind, e.attrs["reason"], e.attrs["at"], e.attrs["src"])
                    for e in evs] == [("client", "l2-drop", "ip", "cell", "10.77.0.2")]
            # the control: the allowed pair still flows through both tables
            assert connect(topo["client"], web.address, 8080) == "ok hello"
        finally:
            clog.close()
    finally:
        ct.close()
        hlog.close()


def test_socket_errors_name_the_netns(tmp_path: Path) -> None:
    with pytest.raises(Exception) as exc:
        adapter.open_nflog(netlog.LOG_GROUP, tmp_path / "no-such-netns")
    assert "no-such-netns" in str(exc.value)
    ns = f"nme-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    try:
        first = adapter.open_nflog(netlog.LOG_GROUP, NETNS / ns)
        try:
            with pytest.raises(Exception) as busy:
                adapter.open_nflog(netlog.LOG_GROUP, NETNS / ns)
            assert "E_KERNEL" in str(busy.value) and "ulogd" in str(busy.value)
        finally:
            first.close()
        adapter.open_nflog(netlog.LOG_GROUP, NETNS / ns).close()  # free again once closed
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_conntrack_filter_drops_other_traffic_in_the_kernel() -> None:
    """The BPF filter, for real: a pool that matches nothing delivers nothing while the
    same traffic reaches a socket whose pool matches."""
    ns = f"nmf-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", "10.77.0.1/24", "dev", "lo")
        sh("ip", "-n", ns, "addr", "add", "10.77.0.5/24", "dev", "lo")
        Nft().apply([{"add": {"table": {"family": "inet", "name": "t"}}},
                     {"add": {"chain": {"family": "inet", "table": "t", "name": "o",
                                        "type": "filter", "hook": "output", "prio": 0,
                                        "policy": "accept"}}},
                     {"add": {"rule": {"family": "inet", "table": "t", "chain": "o", "expr": [
                         {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                    "right": ["new"]}}, {"counter": None}]}}}], NETNS / ns)
        mine = adapter.open_conntrack(POOL, NETNS / ns)
        other = adapter.open_conntrack(IPv4Network("10.99.0.0/16"), NETNS / ns)
        try:
            send = ("import socket\nfor src in ('10.77.0.1', '127.0.0.1'):\n"
                    "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                    "    s.bind((src, 0)); s.sendto(b'x', ('10.77.0.5', 9))\n")
            sh("ip", "netns", "exec", ns, sys.executable, "-c", send)
            time.sleep(0.3)
            got = [wire.parse_ct_new(m) for d in mine.read(16) for _, _, m in
                   wire.iter_messages(d)]
            assert [(e.src, e.dst) for e in got if e] == [("10.77.0.1", "10.77.0.5")]
            assert other.read(16) == []
        finally:
            mine.close()
            other.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_ll_matches_the_kernel() -> None:
    """names.cell_link_local is what the kernel derives from names.cell_mac."""
    ns = f"nml-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "add", "x0", "type", "veth", "peer", "name", "x1")
        for cell in ("a", "demo-web", "x" * 63):
            sh("ip", "-n", ns, "link", "set", "x0", "down")
            sh("ip", "-n", ns, "link", "set", "x0", "address", cell_mac(cell))
            sh("ip", "-n", ns, "link", "set", "x0", "up")
            sh("ip", "-n", ns, "link", "set", "x1", "up")
            time.sleep(0.2)
            out = sh("ip", "-n", ns, "-6", "-o", "addr", "show", "dev", "x0")
            assert cell_link_local(cell) + "/64" in out, (cell, out)
            assert socket.inet_pton(socket.AF_INET6, cell_link_local(cell))
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


TCP_LISTENERS = """
import os, socket, sys, time
os.setgid(1000); os.setuid(1000)
socks = []
for family, addr, port in ((socket.AF_INET, "127.0.0.1", 4444), (socket.AF_INET6, "::", 4445)):
    s = socket.socket(family); s.bind((addr, port)); s.listen(); socks.append(s)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 5353))
c = socket.socket(); c.bind(("127.0.0.1", 4446))  # bound, never listening
print("ready", flush=True)
sys.stdin.read()
"""


def test_listeners_of_a_netns_are_its_listening_tcp_sockets_only() -> None:
    """The sock_diag dump, for real, in a netns of our own: the TCP listeners (IPv4 and
    IPv6) with their owner's uid; a UDP socket and a bound, unlistening TCP one are not
    listeners; ours (in the host's netns) are not seen from there; a closed listener is
    gone from the next dump."""
    ns = f"nmd-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    mine = socket.socket()
    mine.bind(("127.0.0.1", 0))
    mine.listen()
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        diag = adapter.open_diag(NETNS / ns)
        try:
            assert diag.listeners() == ([], True)  # the control: an empty netns
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                                  TCP_LISTENERS],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
                got, whole = diag.listeners()
                assert whole
                assert sorted((x.proto, x.address, x.port, x.uid) for x in got) == [
                    ("tcp", "127.0.0.1", 4444, 1000), ("tcp", "::", 4445, 1000)]
                assert all(x.inode > 0 for x in got)
                few, whole = diag.listeners(limit=1)
                assert len(few) == 1 and not whole
            finally:
                p.communicate("", timeout=10)
            assert diag.listeners() == ([], True)  # closed with its process
        finally:
            diag.close()
        with pytest.raises(Exception) as exc:
            adapter.open_diag(NETNS / "no-such-netns")
        assert "no-such-netns" in str(exc.value)
    finally:
        mine.close()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
