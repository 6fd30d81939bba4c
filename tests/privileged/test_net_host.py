"""agent.net on the x86 host, for real, inside namespaces this test creates.

The "box" is a network namespace of our own standing in for the set-top box's
root namespace: bridges, veth host sides and forwarding live there, the cells'
namespaces are pinned in /run/netns with unique names, and everything is
removed afterwards.  The host kernel has no bridge VLAN filtering, so the VLAN
parts (ensure_bridge, ensure_vlan_gateway, per-port VLANs) are only checked in
tests/guest/test_net_vlan.py; here the cells sit on two plain bridges, one per
subnet, and traffic between them is routed by the box.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import NetNS, netns

from agent.core import names as cnames
from agent.core.errors import KernelError
from agent.kernel import bridge as kbr
from agent.kernel import net
from agent.kernel import netns as kns

RUN = Path("/run/netns")


def in_ns(path: Path, code: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--net={path}", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=timeout,
    )


def links(ipr: Any) -> set[str]:
    return {str(m.get_attr("IFLA_IFNAME")) for m in ipr.link("dump")}


@pytest.fixture
def box() -> Iterator[tuple[Any, Path]]:
    name = f"agtest-box-{secrets.token_hex(3)}"
    netns.create(name)
    ipr = NetNS(name, flags=0)
    try:
        yield ipr, RUN / name
    finally:
        ipr.close()
        netns.remove(name)


def test_vlan_filtering_is_a_guest_matter(box: tuple[Any, Path]) -> None:
    ipr, _ = box
    try:
        kbr.ensure_bridge(ipr, "agbrx")
    except KernelError as exc:
        assert exc.op == "netlink link set" and "vlan_filtering" in exc.target
        pytest.skip("host kernel has no bridge VLAN filtering: see tests/guest/test_net_vlan.py")
    finally:
        kbr.delete_bridge(ipr, "agbrx")


def test_two_cells_routed_through_the_box(box: tuple[Any, Path]) -> None:
    ipr, box_path = box
    before = links(ipr)
    tag = secrets.token_hex(3)
    cells = {f"agtest-a{tag}": ("agbr8", "10.77.0.2/24", "10.77.0.1/24"),
             f"agtest-b{tag}": ("agbr9", "10.77.1.2/24", "10.77.1.1/24")}
    made: list[str] = []
    try:
        for cell, (bridge, addr, gw) in cells.items():
            ipr.link("add", ifname=bridge, kind="bridge")
            idx = ipr.link_lookup(ifname=bridge)[0]
            g = IPv4Interface(gw)
            ipr.addr("add", index=idx, address=str(g.ip), prefixlen=g.network.prefixlen)
            ipr.link("set", index=idx, state="up")
            path = kns.create_cell_netns(cell)
            made.append(cell)
            assert path == RUN / f"cell-{cell}" and path.exists()
            link = net.create_cell_link(ipr, cell, path, bridge, None, addr, g.ip)
            assert link.host_ifname == cnames.veth_names(cell)[0]
            assert len(link.host_ifname) <= 15

        # the host side: enslaved, up, alias names the cell; peers are gone
        veths = {v.cell: v for v in net.list_cell_veths(ipr)}
        assert set(veths) == set(cells)
        for cell, (bridge, _, _) in cells.items():
            assert veths[cell].master == ipr.link_lookup(ifname=bridge)[0]
            assert not veths[cell].ifname.startswith(cnames.PEER_PREFIX)
        assert set(kns.list_cell_netns()) >= set(cells)

        # inside a cell: eth0 with the address, lo up, default route
        a, b = list(cells)
        with NetNS(str(kns.netns_path(a)), flags=0) as ns:
            names = links(ns)
            assert names == {"lo", "eth0"}
            eth0 = ns.link_lookup(ifname="eth0")[0]
            addrs = {(m.get_attr("IFA_ADDRESS"), m["prefixlen"])
                     for m in ns.addr("dump") if m["index"] == eth0 and m["family"] == 2}
            assert addrs == {("10.77.0.2", 24)}
            routes = [r for r in ns.route("dump") if r["dst_len"] == 0
                      and r.get_attr("RTA_GATEWAY")]
            assert [r.get_attr("RTA_GATEWAY") for r in routes] == ["10.77.0.1"]

        # a cell reaches its gateway only once the box forwards: a TCP
        # connect from cell a to cell b crosses the box's routing
        r = in_ns(box_path, "from agent.kernel.bridge import enable_ip_forward; "
                  "enable_ip_forward();"
                  "print(open('/proc/sys/net/ipv4/ip_forward').read().strip())")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "1"
        server = subprocess.Popen(
            ["nsenter", f"--net={kns.netns_path(b)}", sys.executable, "-c",
             "import socket\n"
             "s = socket.socket(); s.bind(('10.77.1.2', 7777)); s.listen(1)\n"
             "print('ready', flush=True)\n"
             "c, peer = s.accept(); c.sendall(peer[0].encode()); c.close()\n"],
            stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "ready"
            r = in_ns(kns.netns_path(a),
                      "import socket\n"
                      "c = socket.create_connection(('10.77.1.2', 7777), timeout=5)\n"
                      "print(c.recv(100).decode())\n")
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == "10.77.0.2"  # routed, not NATed
        finally:
            server.kill()
            server.wait()
    finally:
        for cell in made:
            net.destroy_cell_link(ipr, cell)
            kns.destroy_cell_netns(cell)
        for bridge in ("agbr8", "agbr9"):
            kbr.delete_bridge(ipr, bridge)

    assert links(ipr) == before
    assert not set(kns.list_cell_netns()) & set(cells)
    assert net.list_cell_veths(ipr) == []
    # idempotent destruction: doing it again is not an error
    for cell in cells:
        net.destroy_cell_link(ipr, cell)
        kns.destroy_cell_netns(cell)


def test_failed_link_is_undone(box: tuple[Any, Path]) -> None:
    ipr, _ = box
    cell = f"agtest-f{secrets.token_hex(3)}"
    ipr.link("add", ifname="agbr7", kind="bridge")
    try:
        missing = RUN / f"cell-{cell}-missing"
        with pytest.raises(KernelError) as e:
            net.create_cell_link(ipr, cell, missing, "agbr7", None, "10.77.0.2/24", "10.77.0.1")
        assert str(missing) in e.value.target
        assert net.list_cell_veths(ipr) == []
        with pytest.raises(KernelError) as e:
            net.create_cell_link(ipr, cell, missing, "nobridge", None, "10.77.0.2/24",
                                 "10.77.0.1")
        assert "nobridge" in e.value.target
    finally:
        kbr.delete_bridge(ipr, "agbr7")


def test_ip_forward_error_names_path(tmp_path: Path) -> None:
    with pytest.raises(KernelError) as e:
        kbr.enable_ip_forward(tmp_path)
    assert e.value.target == str(tmp_path / "sys/net/ipv4/ip_forward")
    (tmp_path / "sys/net/ipv4").mkdir(parents=True)
    (tmp_path / "sys/net/ipv4/ip_forward").write_text("0\n")
    kbr.enable_ip_forward(tmp_path)
    assert (tmp_path / "sys/net/ipv4/ip_forward").read_text() == "1"


def test_names() -> None:
    host, peer = cnames.veth_names("a" * 63)
    assert len(host) == len(peer) == 15 and host[3:] == peer[3:]
    assert cnames.veth_names("x") != cnames.veth_names("y")
    assert os.fspath(kns.netns_path("web")) == "/run/netns/cell-web"
