"""agent.nft and agent.firewall against the host's real nftables, in namespaces of our own.

Topology (all made here and removed after): a "router" netns standing in for the box's
host netns, with one gateway interface per VLAN (``tfw.100``, ``tfw.101``: the rules match
``<bridge>.*``) and ip_forward on; two "cell" netns, web (10.77.0.2, VLAN 100) and client
(10.77.1.2, VLAN 101), each with eth0 to the router.  The agent's tables are applied by
agent.nft exactly as agentd does; connections are made with real sockets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core import firewall as fw
from agent.core import l2fw
from agent.core.firewall import CellFw
from agent.core.manifest import EgressRule, Peer
from agent.core.names import cell_mac
from agent.kernel.nft import FirewallSync, Nft


@pytest.fixture(autouse=True)
def _tools() -> None:
    # Tools ./dev test installs: missing, they fail (a skip would hide the firewall tests).
    missing = [t for t in ("nft", "ip") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: ./dev test installs them "
                    "(nftables, iproute2)")


NETNS = Path("/run/netns")
BR = "tfw"


def sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise AssertionError(f"{argv}: {r.stderr}")
    return r.stdout


def py_in(ns: str, code: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=timeout)


SERVE = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {port})); s.listen(8); print("ready", flush=True)
while True:
    c, a = s.accept(); c.sendall(b"hello"); c.close()
"""

CONNECT = """
import socket, sys
s = socket.socket(); s.settimeout({timeout})
try:
    s.connect(("{addr}", {port})); print("ok", s.recv(16).decode())
except OSError as e:
    print("fail", type(e).__name__)
"""


def connect(ns: str, addr: str, port: int, timeout: float = 1.5) -> str:
    r = py_in(ns, CONNECT.format(addr=addr, port=port, timeout=timeout))
    return r.stdout.strip()


@pytest.fixture
def topo() -> Iterator[dict[str, Any]]:
    tag = uuid.uuid4().hex[:6]
    router, web, client = f"fwr-{tag}", f"fww-{tag}", f"fwc-{tag}"
    made: list[str] = []
    servers: list[subprocess.Popen[str]] = []
    try:
        for ns in (router, web, client):
            sh("ip", "netns", "add", ns)
            made.append(ns)
        for ns, vlan, addr, peer, name in ((web, 100, "10.77.0.2/24", "10.77.0.1", "web"),
                                           (client, 101, "10.77.1.2/24", "10.77.1.1",
                                            "client")):
            gw = f"{BR}.{vlan}"
            sh("ip", "-n", router, "link", "add", gw, "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            sh("ip", "-n", router, "addr", "add", f"{peer}/24", "dev", gw)
            sh("ip", "-n", router, "link", "set", gw, "up")
            sh("ip", "-n", ns, "addr", "add", addr, "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "address", cell_mac(name))  # as agentd
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", peer)
        sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for ns, port in ((web, 8080), (web, 8081), (client, 9000)):
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                                  SERVE.format(port=port)], stdout=subprocess.PIPE, text=True)
            servers.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield {"router": router, "web": web, "client": client}
    finally:
        for p in servers:
            p.kill()
            p.wait()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


WEB = CellFw("web", 100, "10.77.0.2")
CLIENT = CellFw("client", 101, "10.77.1.2", peers=(Peer("web", (8080,)),))


def counter(table: dict[str, Any], chain: str, comment: str) -> int:
    for item in table["nftables"]:
        r = item.get("rule")
        if r and r["chain"] == chain and r.get("comment") == comment:
            for e in r["expr"]:
                if "counter" in e:
                    return int(e["counter"]["packets"])
    raise AssertionError(f"no counted rule {comment!r} in {chain}")


# agentd's default (libnftables in its process), and the nft tool (the fallback) entering
# a cell's netns through nsenter or by itself
WAYS = {"library": lambda: Nft(), "nsenter": lambda: Nft(library=False),
        "setns": lambda: Nft(nsenter="", library=False)}


def test_the_library_is_used_by_default() -> None:
    assert Nft().lib is not None, "libnftables not loadable: ./dev test installs nftables"
    assert Nft(library=False).lib is None and Nft(nft="/usr/sbin/nft").lib is None


@pytest.mark.parametrize("way", list(WAYS))
def test_tables_enforce_the_manifests(topo: dict[str, Any], way: str) -> None:
    nft = WAYS[way]()
    r, w, c = (NETNS / topo[k] for k in ("router", "web", "client"))
    # without any table everything routes: the topology itself works
    assert connect(topo["client"], WEB.address, 8081) == "ok hello"
    assert connect(topo["web"], CLIENT.address, 9000) == "ok hello"

    names = {"web": topo["web"], "client": topo["client"]}
    sync = FirewallSync(nft, BR, lambda cell: NETNS / names[cell], host_netns=r)
    sync.apply_cell("web", fw.cell_ruleset(WEB, []))  # as planned: no client yet
    assert sync.refresh([WEB], ["web"]) == []
    sync.apply_cell("client", fw.cell_ruleset(CLIENT, [WEB]))
    assert sync.refresh([WEB, CLIENT], ["web", "client"]) == []  # web learns its client

    assert connect(topo["client"], WEB.address, 8080) == "ok hello"  # the allowed pair
    before = counter(nft.list_table(fw.HOST_TABLE, r) or {}, "cell_to_cell",
                     "drop cell to cell")
    # the web cell's table would let the client through on 8081?  No: and the host too
    # drops it; check the host alone by lifting the cell tables
    nft.delete_table(fw.CELL_TABLE, w)
    nft.delete_table(fw.CELL_TABLE, c)
    assert connect(topo["client"], WEB.address, 8081).startswith("fail")
    assert connect(topo["web"], CLIENT.address, 9000).startswith("fail")  # no way back
    after = counter(nft.list_table(fw.HOST_TABLE, r) or {}, "cell_to_cell", "drop cell to cell")
    assert after >= before + 2
    # the cell tables alone (host table gone) hold too
    assert sync.refresh([], []) == []  # no cell: no host table
    assert nft.list_table(fw.HOST_TABLE, r) is None
    assert FirewallSync(nft, BR, lambda cell: NETNS / names[cell], host_netns=r).refresh(
        [WEB, CLIENT], ["web", "client"]) == []  # a fresh agentd re-applies every table
    nft.delete_table(fw.HOST_TABLE, r)
    assert connect(topo["client"], WEB.address, 8080) == "ok hello"
    assert connect(topo["client"], WEB.address, 8081).startswith("fail")
    assert connect(topo["web"], CLIENT.address, 9000).startswith("fail")
    wt, ct = nft.list_table(fw.CELL_TABLE, w), nft.list_table(fw.CELL_TABLE, c)
    assert ct is not None and counter(ct, "output", "drop out") >= 1  # client -> 8081
    assert wt is not None and counter(wt, "output", "drop out") >= 1  # web -> client
    # the host's own services: the gateway address is closed to cells
    nft.apply(fw.host_ruleset([WEB, CLIENT], BR), r)
    nft.delete_table(fw.CELL_TABLE, c)
    assert connect(topo["client"], "10.77.1.1", 22, timeout=1).startswith("fail")
    ht = nft.list_table(fw.HOST_TABLE, r)
    assert ht is not None and counter(ht, "cell_to_host", "drop cell to host") >= 1


def test_delete_is_idempotent_and_leaves_nothing(topo: dict[str, Any]) -> None:
    nft = Nft()
    r = NETNS / topo["router"]
    before = sh("ip", "netns", "exec", topo["router"], "nft", "list", "ruleset")
    nft.apply(fw.host_ruleset([WEB, CLIENT], BR), r)
    nft.apply(fw.host_ruleset([WEB], BR), r)  # replaced whole, not appended
    t = nft.list_table(fw.HOST_TABLE, r)
    assert t is not None
    assert not [i for i in t["nftables"] if "rule" in i and i["rule"]["chain"] == "cell_to_cell"
                and any("accept" in e for e in i["rule"]["expr"])]
    nft.delete_table(fw.HOST_TABLE, r)
    nft.delete_table(fw.HOST_TABLE, r)
    assert nft.list_table(fw.HOST_TABLE, r) is None
    assert sh("ip", "netns", "exec", topo["router"], "nft", "list", "ruleset") == before


@pytest.mark.parametrize("way", list(WAYS))
def test_errors_name_the_netns_and_nft_words(tmp_path: Path, way: str) -> None:
    nft = WAYS[way]()
    with pytest.raises(Exception) as exc:
        nft.apply(fw.cell_ruleset(WEB, []), tmp_path / "no-such-netns")
    assert "no-such-netns" in str(exc.value)
    bad = fw.cell_ruleset(WEB, [])
    bad.append({"add": {"rule": {"family": "inet", "table": fw.CELL_TABLE,
                                 "chain": "nonexistent", "expr": [{"accept": None}]}}})
    ns = f"fwe-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    try:
        with pytest.raises(Exception) as exc2:
            nft.apply(bad, NETNS / ns)
        assert "E_NFT" in str(exc2.value) and ns in str(exc2.value)
        assert "nonexistent" in str(exc2.value) or "No such file" in str(exc2.value)
        # the batch was one transaction: nothing of it is left
        assert nft.list_table(fw.CELL_TABLE, NETNS / ns) is None
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert os.geteuid() == 0


# -- every generated ruleset is one the kernel takes --------------------------------------

NAME = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,62}", fullmatch=True).filter(
    lambda n: ".." not in n)


@st.composite
def cell_sets(draw: st.DrawFn) -> list[CellFw]:
    names = draw(st.lists(NAME, min_size=1, max_size=4, unique=True))
    cells = []
    for i, name in enumerate(names):
        vlan = draw(st.integers(100, 355))
        peers = tuple(Peer(draw(st.sampled_from(names)), tuple(sorted(draw(st.lists(
            st.integers(1, 65535), min_size=1, max_size=3, unique=True)))),
            draw(st.sampled_from(["tcp", "udp"]))) for _ in range(draw(st.integers(0, 2))))
        egress = tuple(draw(st.lists(st.builds(
            EgressRule, st.sampled_from([None, "0.0.0.0/0", "192.168.1.0/24", "8.8.8.8/32"]),
            st.one_of(st.none(), st.integers(1, 65535)), st.sampled_from(["tcp", "udp", "any"])),
            max_size=2)))
        cells.append(CellFw(name, vlan, f"10.77.{vlan - 100}.{i + 2}", peers, draw(
            st.booleans()), egress, f"10.77.{vlan - 100}.1"))
    return cells


@pytest.fixture(scope="module")
def check_ns() -> Iterator[str]:
    ns = f"fwk-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cells=cell_sets())
def test_kernel_accepts_every_generated_ruleset(check_ns: str, cells: list[CellFw]) -> None:
    """``nft -c`` (the kernel checks the whole transaction, nothing is applied) for the host
    table, the layer-2 table and every cell's table, for any names the manifests allow."""
    batches = [fw.host_ruleset(cells, "agbr0"), l2fw.l2_ruleset(cells),
               *(fw.cell_ruleset(c, cells) for c in cells)]
    for batch in batches:
        r = subprocess.run(["ip", "netns", "exec", check_ns, "nft", "-c", "-j", "-f", "-"],
                           input=fw.batch_json(batch), capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, (r.stderr[:500], [c.name for c in cells])


def _held(nft: Nft, ns: Path) -> dict[str, Any]:
    """Both host tables as the kernel lists them, without what differs between two ways
    of making the same table (handles, counters, the order chains and elements were
    made in)."""
    out: dict[str, Any] = {}
    for family, table in ((fw.FAMILY, fw.HOST_TABLE), (l2fw.FAMILY, l2fw.L2_TABLE)):
        listed = nft.list_table(table, ns, family=family)
        assert listed is not None, f"{family} {table} missing"
        chains, rules, maps = {}, {}, {}
        for item in listed["nftables"]:
            (kind, obj), = item.items()
            obj = {k: v for k, v in obj.items() if k != "handle"}
            if kind == "chain":
                chains[obj["name"]] = obj
            elif kind == "rule":
                expr = [e for e in obj["expr"] if "counter" not in e]
                rules.setdefault(obj["chain"], []).append((repr(expr), obj.get("comment")))
            elif kind == "map":
                maps[obj["name"]] = sorted(map(repr, obj.get("elem", [])))
        out[table] = (chains, rules, maps)
    return out


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pool=cell_sets(), steps=st.lists(st.sets(st.integers(0, 3)), min_size=2, max_size=5))
def test_the_kernel_holds_after_changes_by_sections_what_a_rebuild_makes(
        check_ns: str, pool: list[CellFw], steps: list[set[int]]) -> None:
    """Cells come and go: the host's tables, changed by sections in the kernel, list the
    same as the same tables made whole in a fresh netns (agent.core.nftsections)."""
    nft = Nft()
    ns = NETNS / check_ns
    sync = FirewallSync(nft, "agbr0", lambda c: ns, host_netns=ns)
    fresh = f"fwf-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", fresh)
    try:
        for step in steps:
            cells = [pool[i] for i in sorted(step) if i < len(pool)]
            assert sync.refresh(cells, []) == []
            if not cells:
                assert nft.list_table(fw.HOST_TABLE, ns) is None
                continue
            FirewallSync(nft, "agbr0", lambda c: ns, host_netns=NETNS / fresh).refresh(
                cells, [])
            assert _held(nft, ns) == _held(nft, NETNS / fresh)
    finally:
        subprocess.run(["ip", "netns", "del", fresh], capture_output=True)
        sync.refresh([], [])
