"""agent.net on the box's kernel, which has bridge VLAN filtering.

Works in the box's root network namespace (the box is throw-away) with a
bridge of its own, and checks at the end that links, bridge VLANs and
/run/netns are exactly as before.  `bridge` is iproute2's; the box's `ip` is
busybox (no JSON), so links are compared through netlink.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute, NetNS

from agent.core import names
from agent.core.addrpool import AddrPool, PoolConfig
from agent.kernel import bridge as kbr
from agent.kernel import net
from agent.kernel import netns as kns

BRIDGE = "agtbr0"
BRIDGE_CMD = shutil.which("bridge") or "/sbin/bridge"
FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def bridge_vlans_json() -> Any:
    out = subprocess.run([BRIDGE_CMD, "-j", "vlan", "show"], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out or "[]")


def vlan_table() -> dict[str, dict[int, set[str]]]:
    """``bridge -j vlan show`` as {ifname: {vid: {flags}}}."""
    table: dict[str, dict[int, set[str]]] = {}
    for port in bridge_vlans_json():
        for v in port.get("vlans", []):
            table.setdefault(port["ifname"], {})[v["vlan"]] = set(v.get("flags", []))
    return table


def link_names(ipr: Any) -> set[str]:
    return {str(m.get_attr("IFLA_IFNAME")) for m in ipr.link("dump")}


def state(ipr: Any) -> tuple[set[str], Any, list[str], set[str]]:
    run = sorted(p.name for p in kns.NETNS_DIR.iterdir()) if kns.NETNS_DIR.exists() else []
    return (link_names(ipr), bridge_vlans_json(), run,
            {p.name for p in Path("/sys/class/net").iterdir()})


def in_ns(path: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net={path}", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=30)


def connect(src: Path, dst: str, port: int, timeout: float = 3.0) -> str:
    """TCP connect from inside netns ``src``; returns 'ok <peer-seen-addr>' or the error."""
    r = in_ns(src,
              "import socket\n"
              "try:\n"
              f"    c = socket.create_connection(('{dst}', {port}), timeout={timeout})\n"
              "    print('ok', c.recv(100).decode())\n"
              "except OSError as e:\n"
              "    print('fail', type(e).__name__)\n")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def serve_in(path: Path, addr: str, port: int) -> subprocess.Popen[str]:
    """A one-connection server inside netns ``path``: replies with the peer address."""
    p = subprocess.Popen(
        ["nsenter", f"--net={path}", sys.executable, "-c",
         "import socket\n"
         f"s = socket.socket(); s.bind(('{addr}', {port})); s.listen(4)\n"
         "print('ready', flush=True)\n"
         "while True:\n"
         "    c, peer = s.accept(); c.sendall(peer[0].encode()); c.close()\n"],
        stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


@pytest.fixture
def ipr() -> Iterator[Any]:
    with IPRoute() as handle:
        yield handle


def test_bridge_flags(ipr: Any) -> None:
    before = state(ipr)
    try:
        idx = kbr.ensure_bridge(ipr, BRIDGE)
        assert kbr.ensure_bridge(ipr, BRIDGE) == idx  # idempotent
        sysfs = Path(f"/sys/class/net/{BRIDGE}/bridge")
        assert (sysfs / "vlan_filtering").read_text().strip() == "1"
        assert (sysfs / "default_pvid").read_text().strip() == "0"
        assert Path(f"/sys/class/net/{BRIDGE}/operstate").read_text().strip() in ("up",
                                                                                  "unknown",
                                                                                  "down")
        assert vlan_table().get(BRIDGE, {}) == {}  # no VLAN 1 on the bridge itself
    finally:
        kbr.delete_bridge(ipr, BRIDGE)
    assert state(ipr) == before


def test_two_vlans_isolated_and_routed(ipr: Any) -> None:
    before = state(ipr)
    forward_before = FORWARD.read_text()
    pool = AddrPool(PoolConfig.make("10.77.0.0/16", 24, 100, 355))
    cells = {"a": 100, "b": 200, "c": 100}
    leases = {cell: pool.allocate(cell, vlan) for cell, vlan in cells.items()}
    servers: list[subprocess.Popen[str]] = []
    made: list[str] = []
    try:
        kbr.ensure_bridge(ipr, BRIDGE)
        for vlan in sorted(set(cells.values())):
            kbr.ensure_vlan_gateway(ipr, BRIDGE, vlan, pool.config.gateway(vlan))
            kbr.ensure_vlan_gateway(ipr, BRIDGE, vlan, pool.config.gateway(vlan))  # idempotent
        assert kbr.list_vlan_gateways(ipr, BRIDGE) == {100: f"{BRIDGE}.100",
                                                       200: f"{BRIDGE}.200"}
        paths = {}
        for cell, lease in leases.items():
            paths[cell] = kns.create_cell_netns(cell)
            made.append(cell)
            net.create_cell_link(ipr, cell, paths[cell], BRIDGE, lease.vlan, lease.address,
                                 lease.gateway)
        assert [str(lease.address) for lease in leases.values()] == [
            "10.77.0.2/24", "10.77.100.2/24", "10.77.0.3/24"]

        # bridge -j vlan show: each port untagged + PVID on its VLAN only (no VLAN 1);
        # the bridge itself a tagged member of both VLANs
        table = vlan_table()
        for cell, vlan in cells.items():
            port = names.veth_names(cell)[0]
            assert table[port] == {vlan: {"PVID", "Egress Untagged"}}, (port, table)
        assert table[BRIDGE] == {100: set(), 200: set()}
        # our netlink reading agrees with iproute2
        ours = kbr.list_bridge_vlans(ipr)
        assert {k: {v.vid: (v.pvid, v.untagged) for v in vs} for k, vs in ours.items()} == {
            k: {vid: ("PVID" in f, "Egress Untagged" in f) for vid, f in vs.items()}
            for k, vs in table.items()}
        assert {v.cell for v in net.list_cell_veths(ipr)} == set(cells)
        assert set(kns.list_cell_netns()) >= set(cells)

        # a cell on VLAN 100 reaches its gateway (a listener on the host)
        gw_listener = socket.socket()
        gw_listener.bind((str(leases["a"].gateway), 0))
        gw_listener.listen(1)
        port = gw_listener.getsockname()[1]

        def accept_one() -> None:
            c, peer = gw_listener.accept()
            c.sendall(peer[0].encode())
            c.close()

        t = threading.Thread(target=accept_one, daemon=True)
        t.start()
        assert connect(paths["a"], "10.77.0.1", port) == "ok 10.77.0.2"
        t.join(5)
        gw_listener.close()

        # same VLAN: bridged directly
        servers.append(serve_in(paths["c"], "10.77.0.3", 8000))
        assert connect(paths["a"], "10.77.0.3", 8000) == "ok 10.77.0.2"

        # different VLAN, same subnet on purpose: the bridge must not carry it.
        # b gets an extra address in VLAN 100's subnet; without VLAN filtering
        # it would reach c directly on layer 2.
        with NetNS(str(paths["b"]), flags=0) as ns:
            eth0 = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=eth0, address="10.77.0.99", prefixlen=24)
        assert connect(paths["b"], "10.77.0.3", 8000, timeout=2.0).startswith("fail")
        with NetNS(str(paths["b"]), flags=0) as ns:  # else b answers a on-link
            ns.addr("del", index=eth0, address="10.77.0.99", prefixlen=24)

        # different VLAN through the host: routed once forwarding is on
        kbr.enable_ip_forward()
        assert FORWARD.read_text().strip() == "1"
        servers.append(serve_in(paths["b"], "10.77.100.2", 8001))
        assert connect(paths["a"], "10.77.100.2", 8001) == "ok 10.77.0.2"
    finally:
        for s in servers:
            s.kill()
            s.wait()
        FORWARD.write_text(forward_before)
        for cell in made:
            net.destroy_cell_link(ipr, cell)
            kns.destroy_cell_netns(cell)
        for vlan in sorted(set(cells.values())):
            kbr.remove_vlan_gateway(ipr, BRIDGE, vlan)
        # the bridge's own VLAN entries are gone before the bridge is
        assert vlan_table().get(BRIDGE, {}) == {}
        kbr.delete_bridge(ipr, BRIDGE)
        for cell in cells:
            pool.release(cell)
    assert state(ipr) == before
    assert pool.vlans_in_use() == frozenset()
