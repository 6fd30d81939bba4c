"""Channel 3 in the box: attacks from inside cells, each blocked where the design blocks
it and reported (channel ``net``) with the cell that did it, each with its control.

Cells of the live agentd (S50agentd):

* ``att-web``    VLAN 170, busybox httpd on 8080;
* ``att-same``   VLAN 170 too (the attacker next to web on layer 2), no peers;
* ``att-client`` VLAN 171, may reach att-web:8080/tcp (its manifest's peer);
* ``att-other``  VLAN 172, no peers;
* probe cells (``att-probe``, ``att-scan``) run a python program as the cell's own
  process (uid 1000 in the cell).

Two kinds of attacker: a cell's own processes (what any service can do: connect where
it was not allowed, scan, bind a forged IPv6 source with IPV6_FREEBIND), stopped by the
cell's own table; and root in the cell's netns (``nsenter --net``: packet sockets, any
frame, the cell's table bypassed: tests/guest/netattack.py), stopped by the bridge's
layer-2 table on the host.  Packets carry no pid: events name the cell (and the uid in
the cell, where a local socket sent the packet).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cellkit import (
    NETNS,
    SERVICES,
    call,
    connect_from,
    ctl,
    ensure_agentd,
    in_cell_netns,
    probe,
    ps,
    sh,
    wait_for,
    write_manifest,
)

from agent.core import firewall as fw
from agent.core.names import cell_link_local, cell_mac
from agent.kernel.bridge import bridge_mac
from agent.kernel.nft import Nft

ATTACK = "/mnt/src/tests/guest/netattack.py"
GWMAC = bridge_mac("agbr0")  # the VLAN gateways agbr0.N carry the bridge's MAC
WEB_PEER = {"cell": "att-web", "ports": [8080], "proto": "tcp"}
CELLS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "att-web": (["httpd", "-f", "-p", "8080", "-h", "/www"], {"vlan": 170, "egress": False}),
    "att-same": (["sleep", "100000"], {"vlan": 170, "egress": False}),
    "att-client": (["sleep", "100000"], {"vlan": 171, "egress": False, "peers": [WEB_PEER]}),
    "att-other": (["sleep", "100000"], {"vlan": 172, "egress": False}),
}


def ruleset() -> Any:
    return json.loads(sh("nft", "-j", "list", "ruleset").stdout or "{}")


@pytest.fixture(scope="module")
def net() -> Iterator[dict[str, Any]]:
    ensure_agentd()
    for name in list(ps()):
        sh("agentctl", "stop", name, check=False)
    before = ruleset()
    for name, (argv, network) in CELLS.items():
        write_manifest(name, argv, uid=1000, service={"workdir": "/www"}, network=network)
    try:
        for name in CELLS:
            assert ctl("run", name)["state"] == "running"
        rows = ps()
        addr = {n: rows[n]["address"] for n in CELLS}
        gw = {n: a.rsplit(".", 1)[0] + ".1" for n, a in addr.items()}
        vlan = {n: rows[n]["vlan"] for n in CELLS}
        gwll = {}
        for n in CELLS:
            out = sh("ip", "-6", "-o", "addr", "show", "dev", f"agbr0.{vlan[n]}").stdout
            gwll[n] = next(w.split("/")[0] for w in out.split() if w.startswith("fe80"))
        yield {"addr": addr, "gw": gw, "vlan": vlan, "gwll": gwll}
    finally:
        for name in CELLS:
            sh("agentctl", "stop", name, check=False)
            (SERVICES / f"{name}.toml").unlink(missing_ok=True)
    assert ruleset() == before, "the nftables ruleset is not as before the cells"


# -- helpers ---------------------------------------------------------------------------------


def last_seq() -> int:
    evs = call("events", n=1)
    return int(evs[-1]["seq"]) if evs else 0


def net_events(since: int, **filters: Any) -> list[dict[str, Any]]:
    return [e for e in call("events", n=1000, channel="net", **filters) if e["seq"] > since]


def wait_event(since: int, cell: str, kind: str, timeout: float = 30,
               **attrs: Any) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for e in net_events(since, cell=cell, kind=kind):
            if all(e["attrs"].get(k) == v for k, v in attrs.items()):
                return e
        return None

    e: dict[str, Any] = wait_for(found, f"net/{kind} of {cell} with {attrs}", timeout=timeout)
    return e


in_cell = in_cell_netns


def attack(net: dict[str, Any], cell: str, *kinds: str, peer: str = "att-web",
           hop: str = "att-client") -> str:
    r = in_cell(cell, "python3", "-I", ATTACK, "--mac", cell_mac(cell), "--ip",
                net["addr"][cell], "--ll", cell_link_local(cell), "--gw", net["gw"][cell],
                "--gwmac", GWMAC, "--gwll", net["gwll"][cell], "--vlan",
                str(net["vlan"][cell]), "--hop-vlan", str(net["vlan"][hop]), "--peer-ip",
                net["addr"][peer], "--peer-mac", cell_mac(peer), *kinds)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


connect = connect_from


CAPTURE = """
import socket, select, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0))
src = bytes.fromhex(sys.argv[1].replace(":", ""))
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    if select.select([s], [], [], 0.2)[0]:
        f = s.recv(4096)
        if f[6:12] == src:
            print("frame", f[12:14].hex(), f[14:60].hex(), flush=True)
"""


class Capture:
    """Frames from ``src_mac`` seen on a cell's eth0, for ``seconds``."""

    def __init__(self, cell: str, src_mac: str, seconds: float = 8) -> None:
        self.p = subprocess.Popen(["nsenter", f"--net={NETNS / f'cell-{cell}'}", "python3",
                                   "-I", "-c", CAPTURE, src_mac, str(seconds)],
                                  stdout=subprocess.PIPE, text=True)
        assert self.p.stdout is not None and self.p.stdout.readline().strip() == "ready"

    def frames(self) -> list[str]:
        out, _ = self.p.communicate(timeout=60)
        return [x for x in out.splitlines() if x.startswith("frame")]


def what(frame: str) -> str:
    """A captured frame's kind: ``udp4:<sport>``, ``icmp6:<type>``, or its ethertype.

    ``frame`` is a ``Capture`` line: "frame <ethertype> <bytes 14..60 in hex>".
    """
    _, etype, hexed = frame.split()
    b = bytes.fromhex(hexed)
    if etype == "0800" and b[9] == 17:
        ihl = (b[0] & 0xF) * 4
        return f"udp4:{int.from_bytes(b[ihl:ihl + 2], 'big')}"
    if etype == "86dd" and b[6] == 58:
        return f"icmp6:{b[40]}"
    return etype


def host_neigh(addr: str) -> str:
    return sh("ip", "neigh", "show", addr).stdout.strip()


# -- reaching an undeclared peer ----------------------------------------------------------


def test_undeclared_peer_is_refused_and_reported(net: dict[str, Any]) -> None:
    web = net["addr"]["att-web"]
    since = last_seq()
    # the control: the declared pair connects, and the new flow is reported (info)
    assert connect("att-client", web, 8080).startswith("ok HTTP/")
    flow = wait_event(since, "att-client", "flow", peer_cell="att-web", dport=8080)
    assert flow["severity"] == "info" and flow["attrs"]["src"] == net["addr"]["att-client"]
    # a cell whose manifest names no peer: refused by its own table, reported as its own
    assert connect("att-other", web, 8080).startswith("fail")
    e = wait_event(since, "att-other", "flow-denied", peer_cell="att-web", dport=8080)
    assert e["severity"] == "notice" and e["attrs"]["at"] == "cell" and "pid" not in e["attrs"]
    # a port its peer entry does not name
    assert connect("att-client", web, 8081).startswith("fail")
    wait_event(since, "att-client", "flow-denied", peer_cell="att-web", dport=8081)
    # channel 3 by itself: att-other's own table lifted, the host refuses and reports
    Nft().delete_table(fw.CELL_TABLE, NETNS / "cell-att-other")
    try:
        assert connect("att-other", web, 8080).startswith("fail")
        e = wait_event(since, "att-other", "flow-denied", at="host", dport=8080)
        assert e["attrs"]["to"] == "cell" and e["attrs"]["peer_cell"] == "att-web"
    finally:
        sh("agentctl", "stop", "att-other")
        assert ctl("run", "att-other")["state"] == "running"
    # no alert for any of it: refusals are notices
    assert [x for x in net_events(since) if x["severity"] == "alert"] == []


def test_a_cells_own_process_is_reported_with_its_uid(net: dict[str, Any]) -> None:
    """The attempt made by the service itself (uid 1000 in its cell), reported from the
    cell's own netns from its very first packet (the socket is opened by the create
    plan, before the service starts)."""
    since = last_seq()
    web = net["addr"]["att-web"]
    code = f"""
s = socket.socket(); s.settimeout(3)
try:
    s.connect(({web!r}, 8080)); r = "connected"
except OSError as e:
    r = type(e).__name__
result({{"undeclared": r}})
"""
    got = probe("att-probe", code, uid=1000, network={"vlan": 173, "egress": False})
    assert got == {"undeclared": "TimeoutError"}  # its SYNs were dropped by its own table
    e = wait_event(since, "att-probe", "flow-denied", dport=8080)
    assert e["attrs"]["uid"] == 1000 and e["attrs"]["peer_cell"] == "att-web"


# -- ARP and MAC spoofing ------------------------------------------------------------------


def test_arp_spoofing_is_dropped_at_the_bridge(net: dict[str, Any]) -> None:
    web, same = net["addr"]["att-web"], net["addr"]["att-same"]
    assert connect("att-client", web, 8080).startswith("ok HTTP/")  # host learns web
    since = last_seq()
    # the control: att-same's own ARP is what the host learns for att-same
    attack(net, "att-same", "own-arp")
    wait_for(lambda: cell_mac("att-same") in host_neigh(same), "the host to learn att-same")
    # att-same claims att-web's address (a reply to the gateway), and sends ARP with
    # another sender MAC: both dropped, reported as att-same's
    attack(net, "att-same", "arp-ip", "arp-mac")
    e = wait_event(since, "att-same", "l2-drop", reason="arp", arp_ip=web)
    assert e["severity"] == "alert" and e["attrs"]["at"] == "bridge"
    wait_event(since, "att-same", "l2-drop", reason="arp", arp_mac=cell_mac("att-web"))
    assert cell_mac("att-same") not in host_neigh(web), host_neigh(web)
    assert connect("att-client", web, 8080).startswith("ok HTTP/")


def test_mac_spoofing_is_dropped_at_the_bridge(net: dict[str, Any]) -> None:
    web = net["addr"]["att-web"]
    since = last_seq()
    attack(net, "att-same", "mac")
    e = wait_event(since, "att-same", "l2-drop", reason="mac", mac="02:00:00:00:be:ef")
    assert e["severity"] == "alert"
    # root in att-client's netns changes its eth0's MAC: all its traffic is dropped and
    # reported, until the agent's MAC is back (the control, before and after)
    netns = f"--net={NETNS / 'cell-att-client'}"
    assert connect("att-client", web, 8080).startswith("ok HTTP/")
    sh("nsenter", netns, "ip", "link", "set", "eth0", "address", "02:00:00:00:be:ee")
    try:
        assert connect("att-client", web, 8080).startswith("fail")
        wait_event(since, "att-client", "l2-drop", reason="mac", mac="02:00:00:00:be:ee")
    finally:
        sh("nsenter", netns, "ip", "link", "set", "eth0", "address", cell_mac("att-client"))
    sh("nsenter", netns, "ip", "neigh", "flush", "dev", "eth0")
    assert connect("att-client", web, 8080).startswith("ok HTTP/")


# -- IPv4 and IPv6 with a forged source ---------------------------------------------------


def test_forged_ipv4_source(net: dict[str, Any]) -> None:
    since = last_seq()
    # the control: att-same's own address passes the bridge and reaches the host's
    # table (which refuses a cell's new connection to the host, and says so)
    attack(net, "att-same", "own-ip")
    wait_event(since, "att-same", "flow-denied", to="host", at="host", dport=9)
    # web's address from att-same: through a packet socket, the bridge drops it ...
    attack(net, "att-same", "ip")
    e = wait_event(since, "att-same", "l2-drop", reason="ip", at="bridge")
    assert e["attrs"]["src"] == net["addr"]["att-web"]
    # ... through the IP stack (a raw socket), the cell's own table already does
    out = attack(net, "att-same", "rawip")
    assert "refused rawip" in out, out
    wait_event(since, "att-same", "l2-drop", reason="ip", at="cell")
    # nothing was reported as if att-web had sent it
    assert net_events(since, cell="att-web") == []


def test_forged_ipv6_source(net: dict[str, Any]) -> None:
    since = last_seq()
    # the control: the cell's own IPv6 works on its link: the host resolves the cell's
    # link-local address (its neighbour advertisement passes the bridge)
    ll = cell_link_local("att-same")
    dev = f"agbr0.{net['vlan']['att-same']}"
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        s.sendto(b"nd", (ll, 9, 0, socket.if_nametoindex(dev)))
    finally:
        s.close()
    wait_for(lambda: cell_mac("att-same") in sh("ip", "-6", "neigh", "show", ll, "dev",
                                                dev).stdout, "the host to resolve att-same")
    # a process of the cell (uid 1000) binds a forged source (IPV6_FREEBIND): its own
    # table refuses to send it
    gwll = net["gwll"]["att-other"]
    code = f"""
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, 78, 1)
idx = socket.if_nametoindex("eth0")
s.bind(("fe80::bad:beef", 0, 0, idx))
result({{"forged": oserr(s.sendto, b"x", ({gwll!r}, 9, 0, idx))}})
"""
    got = probe("att-probe6", code, uid=1000, network={"vlan": 172, "egress": True})
    assert got == {"forged": "EPERM"}
    e = wait_event(since, "att-probe6", "l2-drop", reason="ip6", at="cell")
    assert e["attrs"]["src"] == "fe80::bad:beef" and e["attrs"]["uid"] == 1000
    # root in the netns, packet socket: the bridge drops it (and the unspecified source)
    attack(net, "att-same", "ip6", "ip6-unspec")
    wait_event(since, "att-same", "l2-drop", reason="ip6", at="bridge", src="fe80::bad:beef")
    wait_event(since, "att-same", "l2-drop", reason="ip6", at="bridge", src="::")


# -- VLAN hopping, DHCP and RA ------------------------------------------------------------


def test_tagged_and_double_tagged_frames(net: dict[str, Any]) -> None:
    since = last_seq()
    me = cell_mac("att-same")
    target = Capture("att-client", me)  # VLAN 171: where a hop to 171 would land
    neighbour = Capture("att-web", me)  # VLAN 170: att-same's own VLAN (the control)
    time.sleep(1)
    attack(net, "att-same", "vlan", "qinq", "own-bcast")
    hopped, seen = target.frames(), neighbour.frames()
    assert hopped == [], hopped
    assert [f for f in seen if f.split()[1] == "0800"], seen  # the untagged broadcast
    assert not [f for f in seen if f.split()[1] in ("8100", "88a8")], seen
    e = wait_event(since, "att-same", "l2-drop", reason="vlan")
    assert e["severity"] == "alert"
    wait_event(since, "att-same", "l2-drop", reason="vlan", vlan=net["vlan"]["att-same"],
               inner_vlan=net["vlan"]["att-client"])


def test_dhcp_and_router_advertisements(net: dict[str, Any]) -> None:
    since = last_seq()
    web = Capture("att-web", cell_mac("att-same"))
    time.sleep(1)
    attack(net, "att-same", "dhcp", "ra", "own-bcast")
    kinds = [what(f) for f in web.frames()]
    # the control's broadcast (udp from port 40000) reached att-web; the server's offer
    # (from port 67), the router advertisement (134) and a redirect (137) did not.  The
    # cell's own kernel may speak on its link meanwhile (MLD reports, neighbour
    # solicitations): those are allowed and not what this test is about.
    assert "udp4:40000" in kinds, kinds
    assert not {"udp4:67", "icmp6:134", "icmp6:137"} & set(kinds), kinds
    wait_event(since, "att-same", "l2-drop", reason="dhcp", sport=67)
    wait_event(since, "att-same", "l2-drop", reason="ra")


# -- scans, and a busy service that is none -----------------------------------------------


def test_port_scan_is_reported_once_with_counts(net: dict[str, Any]) -> None:
    web = net["addr"]["att-web"]
    since = last_seq()
    code = f"""
import time
s = socket.socket(); s.settimeout(5)
try:
    s.connect(({web!r}, 8080)); peer = "ok"
except OSError as e:
    peer = str(e)
s.close()
tried = []
for p in range(2000, 2080):
    s = socket.socket(); s.setblocking(False)
    s.connect_ex(({web!r}, p))
    tried.append(s)
time.sleep(2)  # (their SYNs are dropped by the cell's own table, and retried)
result({{"peer": peer, "tried": len(tried)}})
"""
    got = probe("att-scan", code, uid=1000,
                network={"vlan": 174, "egress": False, "peers": [WEB_PEER]})
    assert got == {"peer": "ok", "tried": 80}  # the control: its declared peer works
    e = wait_event(since, "att-scan", "scan", timeout=40)
    assert e["severity"] == "alert"
    assert e["attrs"]["ports"] >= 20 and e["attrs"]["addrs"] == 1, e["attrs"]
    wait_event(since, "att-scan", "flow", peer_cell="att-web", dport=8080)
    time.sleep(2)
    assert len(net_events(since, cell="att-scan", kind="scan")) == 1


def test_a_listening_cell_is_reported_with_the_uid_inside_it(net: dict[str, Any]) -> None:
    since = last_seq()
    code = """
import time
lis = socket.socket(); lis.bind(("0.0.0.0", 7070)); lis.listen()
six = socket.socket(socket.AF_INET6); six.bind(("::", 7072)); six.listen()
bound = socket.socket(); bound.bind(("0.0.0.0", 7071))  # bound, never listening
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("0.0.0.0", 7073))
time.sleep(6)  # (more than two polls)
result({"listening": True})
"""
    assert probe("att-lis", code, uid=1000, network={"vlan": 175}) == {"listening": True}
    e = wait_event(since, "att-lis", "listen", port=7070)
    assert e["severity"] == "info" and e["attrs"]["proto"] == "tcp"
    assert e["attrs"]["uid"] == 1000 and e["attrs"]["address"] == "0.0.0.0", e["attrs"]
    wait_event(since, "att-lis", "listen", port=7072, address="::")
    # the controls: the bound TCP socket and the UDP one are no listeners, each port once
    ports = sorted(x["attrs"]["port"] for x in net_events(since, cell="att-lis",
                                                          kind="listen"))
    assert ports == [7070, 7072], ports


LOAD = """
import socket, sys
n = int(sys.argv[1]); ok = 0
for i in range(n):
    s = socket.socket(); s.settimeout(10)
    s.connect(({addr!r}, 8080)); s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    while s.recv(4096):
        pass
    s.close(); ok += 1
print(ok)
"""


def test_busy_web_server_raises_no_alert(net: dict[str, Any]) -> None:
    """300 connections from the declared client: flows, counted per window, and not a
    single notice or alert for either cell."""
    time.sleep(11)  # earlier flows' windows close
    since = last_seq()
    web = net["addr"]["att-web"]
    t0 = time.monotonic()
    r = in_cell("att-client", "python3", "-I", "-c", LOAD.format(addr=web), "300",
                timeout=600)
    took = time.monotonic() - t0
    assert r.stdout.strip() == "300", r.stdout + r.stderr
    time.sleep(12)  # the flow window closes: its count is published
    evs = net_events(since)
    loud = [e for e in evs if e["severity"] != "info" and e["cell"] in ("att-client",
                                                                       "att-web")]
    assert loud == [], loud
    flows = [e for e in evs if e["kind"] == "flow" and e["cell"] == "att-client"]
    assert sum(e["attrs"]["count"] for e in flows) == 300, flows
    assert len(flows) <= 2 + took / 10, (took, flows)  # one at once, then one per window
    print(f"300 connections in {took:.1f} s: {len(flows)} flow events")
    status = call("status")["net_monitor"]
    assert status["lost"] == 0 and status["errors"] == 0 and not status["failed"], status
