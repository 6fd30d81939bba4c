"""Channels 1 and 3 in the box: the cells' own tables and the host's forwarding table.

Real cells from the live agentd (S50agentd), on VLANs of their own:

* ``fw-web``    VLAN 160, httpd on 8080 and 8081;
* ``fw-client`` VLAN 161, may reach fw-web:8080/tcp (its manifest's peer), serves 9000;
* ``fw-other``  VLAN 162, no peers, serves 8080.

Connections are made from inside each cell's netns (``nsenter --net``: the same netns,
so the same nftables hooks and source address as the cell's own processes) with busybox
wget.  If this agentd applies no tables (built without a firewall), the test applies them
itself with agent.nft.FirewallSync exactly as agentd does, so the rules are still proved
on the box's kernel; ``test_agentd_keeps_the_tables`` then skips with the reason.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cellkit import (
    NETNS,
    SERVICES,
    connect_from,
    ctl,
    ensure_agentd,
    in_cell_netns,
    ps,
    sh,
    wait_for,
    write_manifest,
)

from agent.core import firewall as fw
from agent.core.firewall import CellFw
from agent.core.manifest import load_manifest
from agent.kernel.nft import FirewallSync, Nft

NS_GET_USERNS = 0xB701


def ruleset() -> Any:
    return json.loads(sh("nft", "-j", "list", "ruleset").stdout or "{}")


def netns(cell: str) -> Path:
    return NETNS / f"cell-{cell}"


def in_cell(cell: str, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return in_cell_netns(cell, *argv, timeout=timeout)


connect = connect_from


def fetch(cell: str, addr: str, port: int) -> bool:
    out = connect(cell, addr, port)
    assert out.startswith(("ok", "fail")), out
    return out.startswith("ok HTTP/")


PEER = {"cell": "fw-web", "ports": [8080], "proto": "tcp"}
MANIFESTS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "fw-web": (["sh", "-c", "/bin/busybox httpd -p 8081 -h /www; exec /bin/busybox httpd -f "
                "-p 8080 -h /www"], {"vlan": 160, "egress": False}),
    "fw-client": (["httpd", "-f", "-p", "9000", "-h", "/www"],
                  {"vlan": 161, "egress": False, "peers": [PEER]}),
    "fw-other": (["httpd", "-f", "-p", "8080", "-h", "/www"], {"vlan": 162, "egress": False}),
}


def cell_fws(rows: dict[str, dict[str, Any]]) -> list[CellFw]:
    """What agentd computes for the firewall, from the manifests and ``ps``."""
    out = []
    for n in MANIFESTS:
        c = CellFw.of(load_manifest(str(SERVICES / f"{n}.toml")), rows[n]["vlan"],
                      rows[n]["address"], rows[n]["address"].rsplit(".", 1)[0] + ".1")
        assert c is not None
        out.append(c)
    return out


def restore_table(rows: dict[str, dict[str, Any]], cell: str) -> None:
    cfs = cell_fws(rows)
    me = next(c for c in cfs if c.name == cell)
    Nft().apply(fw.cell_ruleset(me, cfs), netns(cell))


def table_in(cell: str) -> dict[str, Any] | None:
    return Nft().list_table(fw.CELL_TABLE, netns(cell))


@pytest.fixture(scope="module")
def cells() -> Iterator[dict[str, Any]]:
    ensure_agentd()
    for name in list(ps()):
        sh("agentctl", "stop", name, check=False)
    before = ruleset()
    for name, (argv, network) in MANIFESTS.items():
        write_manifest(name, argv, uid=1000, service={"workdir": "/www"}, network=network)
    sync: FirewallSync | None = None
    try:
        for name in MANIFESTS:
            assert ctl("run", name)["state"] == "running"
        rows = ps()
        by_agentd = table_in("fw-web") is not None
        if not by_agentd:  # apply the tables as agentd would (see the module docstring)
            cfs = cell_fws(rows)
            sync = FirewallSync(Nft(), "agbr0", netns)
            for c in cfs:
                sync.apply_cell(c.name, fw.cell_ruleset(c, cfs))
            assert sync.refresh(cfs, [c.name for c in cfs]) == []
        yield {"rows": rows, "by_agentd": by_agentd, "before": before,
               "addr": {n: rows[n]["address"] for n in MANIFESTS},
               "gw": {n: rows[n]["address"].rsplit(".", 1)[0] + ".1" for n in MANIFESTS}}
    finally:
        for name in MANIFESTS:
            sh("agentctl", "stop", name, check=False)
            (SERVICES / f"{name}.toml").unlink(missing_ok=True)
        if sync is not None:
            sync.refresh([], [])  # removes the host table
    assert ruleset() == before, "the nftables ruleset is not as before the cells"


def host_counter(comment: str) -> int:
    t = Nft().list_table(fw.HOST_TABLE)
    assert t is not None
    for item in t["nftables"]:
        r = item.get("rule")
        if r and r.get("comment") == comment:
            return int(next(e["counter"]["packets"] for e in r["expr"] if "counter" in e))
    raise AssertionError(f"no rule {comment!r}")


def test_allowed_pair_connects(cells: dict[str, Any]) -> None:
    web = cells["addr"]["fw-web"]
    out = connect("fw-client", web, 8080)
    assert out.startswith("ok HTTP/"), f"{out}\n{sh('nft', 'list', 'ruleset').stdout}"
    # the host itself (agentd, an operator) may connect into a cell, on any port
    with socket.create_connection((web, 8081), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert s.recv(12).startswith(b"HTTP/")


def test_not_allowed_is_dropped_and_counted(cells: dict[str, Any]) -> None:
    web, client = cells["addr"]["fw-web"], cells["addr"]["fw-client"]
    dropped = host_counter("drop cell to cell")
    assert not fetch("fw-other", web, 8080)  # no manifest lets fw-other in
    assert not fetch("fw-client", web, 8081)  # a port the peer entry does not name
    assert not fetch("fw-web", client, 9000)  # the server cannot connect back
    assert not fetch("fw-other", client, 9000)
    assert fetch("fw-client", web, 8080)  # and the allowed pair still works
    # fw-other's and fw-web's packets leave their netns only if their own table lets them:
    # it does not, so count at the source; the host's counter moves for what gets past.
    other_t = table_in("fw-other")
    assert other_t is not None
    out_drop = [i["rule"] for i in other_t["nftables"] if "rule" in i
                and i["rule"].get("comment") == "drop out"]
    assert int(next(e["counter"]["packets"] for e in out_drop[0]["expr"]
                    if "counter" in e)) >= 1
    assert host_counter("drop cell to cell") >= dropped


def test_host_table_alone_blocks_unlisted_pairs(cells: dict[str, Any]) -> None:
    """Channel 3 by itself: lift fw-other's own table and its packets reach the host,
    which drops and counts them."""
    Nft().delete_table(fw.CELL_TABLE, netns("fw-other"))
    try:
        dropped = host_counter("drop cell to cell")
        assert not fetch("fw-other", cells["addr"]["fw-web"], 8080)
        assert host_counter("drop cell to cell") > dropped
    finally:
        restore_table(cells["rows"], "fw-other")


def _listen(port: int) -> tuple[socket.socket, threading.Event]:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(4)
    got = threading.Event()

    def serve() -> None:
        try:
            c, _ = srv.accept()
            got.set()
            c.close()
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    return srv, got


def test_cell_cannot_reach_the_host(cells: dict[str, Any]) -> None:
    srv, got = _listen(7777)
    try:
        gw = cells["gw"]["fw-other"]
        out = connect("fw-other", gw, 7777)
        assert out.startswith("fail") and not got.is_set(), out
        # with fw-other's own table lifted, the host's input chain still drops it
        Nft().delete_table(fw.CELL_TABLE, netns("fw-other"))
        dropped = host_counter("drop cell to host")
        out = connect("fw-other", gw, 7777)
        assert out.startswith("fail") and not got.is_set(), out
        assert host_counter("drop cell to host") > dropped
        # the control: the host itself connects
        with socket.create_connection(("127.0.0.1", 7777), timeout=3):
            pass
        assert got.wait(3)
    finally:
        srv.close()
        restore_table(cells["rows"], "fw-other")


def test_cell_netns_belongs_to_the_host_user_namespace(cells: dict[str, Any]) -> None:
    """Why cell root cannot change its table: CAP_NET_ADMIN must be held in the user
    namespace that owns the netns, which is the host's, not the cell's."""
    fd = os.open(netns("fw-web"), os.O_RDONLY)
    try:
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
        try:
            assert os.fstat(owner).st_ino == os.stat("/proc/1/ns/user").st_ino
        finally:
            os.close(owner)
    finally:
        os.close(fd)
    pid = cells["rows"]["fw-web"]["pid"]
    assert os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/1/ns/user").st_ino


def test_root_in_a_cell_cannot_change_its_network(cells: dict[str, Any]) -> None:
    name = "fw-root"
    script = ("busybox ip link set lo down; echo link=$?; "
              "busybox ip addr add 10.9.9.9/32 dev lo; echo addr=$?; "
              "busybox ip route add 10.9.0.0/16 dev eth0; echo route=$?; "
              "busybox unshare -r busybox ip link set lo down; echo nested=$?")
    write_manifest(name, ["sh", "-c", script], network={"vlan": 163}, oneshot=True,
                   lifecycle={"destroy_on_exit": False})
    try:
        ctl("run", name)
        wait_for(lambda: ps().get(name, {}).get("state") != "running", f"{name} to exit")
        lines = [x["line"] for x in ctl("logs", name)["lines"]]
        rcs = dict(x.split("=") for x in lines if "=" in x and x.split("=")[0] in
                   ("link", "addr", "route", "nested"))
        assert set(rcs) == {"link", "addr", "route", "nested"}, lines
        assert all(v != "0" for v in rcs.values()), lines
        assert any("not permitted" in x.lower() for x in lines), lines
        link = sh("ip", "-n", f"cell-{name}", "-j", "addr", "show", "dev", "lo").stdout
        info = json.loads(link)[0]
        assert "UP" in info["flags"] and not any(
            a["local"] == "10.9.9.9" for a in info["addr_info"]), info
        t = table_in(name)
        if cells["by_agentd"]:
            assert t is not None  # and unchanged: the cell could not have touched it
    finally:
        sh("agentctl", "stop", name, check=False)
        (SERVICES / f"{name}.toml").unlink(missing_ok=True)


def test_agentd_keeps_the_tables(cells: dict[str, Any]) -> None:
    if not cells["by_agentd"]:
        pytest.fail("this agentd applies no nftables tables: masterops.build_manager "
                    "passes no firewall to CellManager")
    host = Nft().list_table(fw.HOST_TABLE)
    assert host is not None
    # the client's flows: a chain of its own, reached from cell_to_cell via the peers map
    pairs = [i["rule"] for i in host["nftables"] if "rule" in i
             and i["rule"]["chain"] == "peers_fw-client" and any("accept" in e
                                                                 for e in i["rule"]["expr"])]
    assert any("fw-client" in str(i["map"].get("elem")) for i in host["nftables"]
               if "map" in i and i["map"]["name"] == fw.PEERS_MAP)
    assert [p.get("comment") for p in pairs] == ["peer fw-client -> fw-web 8080/tcp"]
    web = table_in("fw-web")
    assert web is not None and any(
        i["rule"].get("comment") == "peer fw-client -> fw-web 8080/tcp"
        for i in web["nftables"] if "rule" in i and i["rule"]["chain"] == "input")
    # the client goes: the web cell's table forgets it, the host's pair rule goes
    sh("agentctl", "stop", "fw-client")
    try:
        web = table_in("fw-web")
        assert web is not None and not any(
            "fw-client" in i["rule"].get("comment", "") for i in web["nftables"] if "rule" in i)
        host = Nft().list_table(fw.HOST_TABLE)
        assert host is not None and not any(
            "fw-client" in i["rule"].get("comment", "") for i in host["nftables"]
            if "rule" in i)
    finally:
        assert ctl("run", "fw-client")["state"] == "running"
    cells["addr"]["fw-client"] = ps()["fw-client"]["address"]
    assert fetch("fw-client", cells["addr"]["fw-web"], 8080)
