"""agent.firewall rule generation, the ApplyCellFirewall step and FirewallSync's bookkeeping.

The rules are checked by reading the generated nft JSON back (what each accept rule
matches), never against hard-coded text, so the tests hold for any equivalent encoding.
The same batches are applied by the kernel in tests/privileged/test_nft_host.py and
tests/guest/test_firewall_box.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nfteval import FakeNft

from agent.core import firewall as fw
from agent.core.cellctx import Context
from agent.core.cellops import ApplyCellFirewall, MakeLink, StartService
from agent.core.config import AgentConfig
from agent.core.errors import ConfigError
from agent.core.firewall import CellFw
from agent.core.manifest import EgressRule, Manifest, Peer, load_manifest, parse_manifest
from agent.core.plan import op_from_wire, op_to_wire
from agent.core.planner import Allocation, cell_firewall, plan_create
from agent.kernel.nft import FirewallSync

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "rootfs-overlay/etc/agent/services"
CFG = AgentConfig(state_dir=Path("/var/lib/agent"), run_dir=Path("/run/agent"))
WEB_ALLOC = Allocation(100, "10.77.0.2/24", "10.77.0.1", 100_000)
CLIENT_ALLOC = Allocation(101, "10.77.1.2/24", "10.77.1.1", 165_536)


def demo(name: str) -> Manifest:
    return load_manifest(str(SERVICES / f"{name}.toml"))


def demo_cells() -> tuple[CellFw, CellFw]:
    web = cell_firewall(demo("demo-web"), WEB_ALLOC)
    client = cell_firewall(demo("demo-client"), CLIENT_ALLOC)
    assert web is not None and client is not None
    return web, client


# -- reading rules back ------------------------------------------------------------------


@dataclass
class Rule:
    chain: str
    verdict: str  # accept, drop, jump:<chain>
    m: dict[str, Any] = field(default_factory=dict)  # left key -> (op, right)
    comment: str = ""


def _left(left: dict[str, Any]) -> str:
    if "meta" in left:
        return str(left["meta"]["key"])
    if "payload" in left:
        return f"{left['payload']['protocol']}.{left['payload']['field']}"
    if "ct" in left:
        return f"ct.{left['ct']['key']}"
    raise AssertionError(f"unexpected match {left}")


# a cell's own chains in the host table, reached through a map keyed by (its address,
# its gateway): shown as rules of the shared chain with that key as matches
_VIA_MAP = {"peers_": "cell_to_cell", "egress_": "from_cell"}


def _map_keys(batch: Sequence[dict[str, Any]]) -> dict[str, dict[str, tuple[str, Any]]]:
    keys = {}
    for cmd in batch:
        e = cmd.get("add", {}).get("element")
        for key, verdict in (e or {}).get("elem", []):
            if isinstance(key, dict) and "concat" in key:
                addr, dev = key["concat"]
                keys[verdict["jump"]["target"]] = {"ip.saddr": ("==", addr),
                                                   "iifname": ("==", dev)}
    return keys


def rules(batch: Sequence[dict[str, Any]]) -> list[Rule]:
    out = []
    via = _map_keys(batch)
    for cmd in batch:
        r = cmd.get("add", {}).get("rule")
        if r is None:
            continue
        verdict, m = "", dict(via.get(r["chain"], {}))
        for e in r["expr"]:
            if "match" in e:
                m[_left(e["match"]["left"])] = (e["match"]["op"], e["match"]["right"])
            elif "accept" in e:
                verdict = "accept"
            elif "drop" in e:
                verdict = "drop"
            elif "jump" in e:
                verdict = "jump:" + e["jump"]["target"]
            elif "goto" in e:
                verdict = "goto:" + e["goto"]["target"]
            elif "log" in e:
                verdict = "log:" + e["log"]["prefix"]
        chain = next((shared for pre, shared in _VIA_MAP.items() if r["chain"] in via
                      and r["chain"].startswith(pre)), r["chain"])
        out.append(Rule(chain, verdict, m, r.get("comment", "")))
    return out


def _addr(v: Any) -> str:
    if isinstance(v, dict):
        return f"{v['prefix']['addr']}/{v['prefix']['len']}"
    return f"{v}/32"


def _ports(v: Any) -> set[int]:
    return set(v["set"]) if isinstance(v, dict) else {v}


def _proto_ports(r: Rule) -> tuple[str, set[int]]:
    for proto in ("tcp", "udp"):
        if f"{proto}.dport" in r.m:
            return proto, _ports(r.m[f"{proto}.dport"][1])
    raise AssertionError(f"no port match in {r}")


def meaningful_accepts(batch: Sequence[dict[str, Any]]) -> list[Rule]:
    """Every accept that is neither loopback, a reply, neighbour discovery (IPv6 on the
    link, tests/unit/test_firewall_semantics.py) nor the host's way in."""
    return [r for r in rules(batch) if r.verdict == "accept" and "ct.state" not in r.m
            and r.m.get("iifname") != ("==", "lo") and r.m.get("oifname") != ("==", "lo")
            and r.comment not in ("from the host", "neighbour discovery")]


def host_way_in(batch: Sequence[dict[str, Any]]) -> list[Rule]:
    return [r for r in rules(batch) if r.comment == "from the host"]


# -- the demo manifests --------------------------------------------------------------------


def test_demo_client_reaches_demo_web_8080_and_nothing_else() -> None:
    web, client = demo_cells()
    host = rules(fw.host_ruleset([web, client], "agbr0"))
    pairs = [r for r in host if r.chain == "cell_to_cell" and r.verdict == "accept"]
    assert len(pairs) == 1
    (p,) = pairs
    assert p.m["ip.saddr"] == ("==", client.address) and p.m["ip.daddr"] == ("==", web.address)
    assert p.m["iifname"] == ("==", f"agbr0.{client.vlan}")
    assert p.m["oifname"] == ("==", f"agbr0.{web.vlan}")
    assert _proto_ports(p) == ("tcp", {8080})
    # neither has egress: nothing else is accepted anywhere but replies
    others = [r for r in meaningful_accepts(fw.host_ruleset([web, client], "agbr0"))
              if r.chain != "cell_to_cell"]
    assert others == []
    # the chains end in a counted drop, reported first (but what comes from outside);
    # the hooks do not touch other host traffic
    for chain in ("from_cell", "cell_to_cell", "into_cell", "cell_to_host"):
        tail = [r for r in host if r.chain == chain
                and not r.comment.startswith(("peer ", "egress "))][-2:]
        assert tail[-1].verdict == "drop" and not tail[-1].m
        assert (tail[0].verdict == "jump:deny_log") == (chain != "into_cell")
    assert [r.verdict for r in host if r.chain == "forward"] == ["jump:from_cell",
                                                                 "jump:into_cell"]


def test_demo_cell_tables() -> None:
    web, client = demo_cells()
    wb = fw.cell_ruleset(web, [web, client])
    cb = fw.cell_ruleset(client, [web, client])
    (inp,) = meaningful_accepts([c for c in wb if _chain(c) == "input"])
    assert inp.m["ip.saddr"] == ("==", client.address) and _proto_ports(inp) == ("tcp", {8080})
    assert [r for r in meaningful_accepts(wb) if r.chain == "output"] == []
    (out,) = [r for r in meaningful_accepts(cb) if r.chain == "output"]
    assert out.m["ip.daddr"] == ("==", web.address) and _proto_ports(out) == ("tcp", {8080})
    assert [r for r in meaningful_accepts(cb) if r.chain == "input"] == []
    for b, me in ((wb, web), (cb, client)):
        (h,) = host_way_in(b)  # the host (its address on the cell's VLAN) may connect in
        assert h.chain == "input" and h.m == {"ip.saddr": ("==", me.gateway)}
        assert me.gateway == me.address.rsplit(".", 1)[0] + ".1"
        chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in b
                  if "chain" in c.get("add", {})}
        assert {n: c.get("policy") for n, c in chains.items()} == {
            "input": "drop", "output": "drop", "spoof": None}
        spoof = [r for r in rules(b) if r.m.get("ip.saddr", ("",))[0] == "!="]
        assert len(spoof) == 1 and spoof[0].m["ip.saddr"][1] == me.address
        assert spoof[0].verdict == "jump:spoof" and spoof[0].chain == "output"
        assert [r.verdict for r in rules(b) if r.chain == "spoof"] == ["log:agent:spoof",
                                                                       "drop"]


def _chain(cmd: dict[str, Any]) -> str:
    return str(cmd.get("add", {}).get("rule", {}).get("chain", ""))


def test_peer_that_does_not_exist_gets_no_rule() -> None:
    _, client = demo_cells()
    assert meaningful_accepts(fw.cell_ruleset(client, [])) == []
    host = fw.host_ruleset([client], "agbr0")
    assert meaningful_accepts(host) == []


def test_cell_with_no_peers_and_no_egress_accepts_nothing() -> None:
    lone = CellFw("lone", 120, "10.77.20.2")
    web, client = demo_cells()
    assert meaningful_accepts(fw.cell_ruleset(lone, [lone, web, client])) == []


def test_egress_any_and_rules() -> None:
    base = CellFw("out", 110, "10.77.10.2")
    anyc = CellFw("out", 110, "10.77.10.2", egress_any=True)
    listed = CellFw("out", 110, "10.77.10.2", egress=(
        EgressRule("192.168.0.0/16", 443, "tcp"), EgressRule(None, 53, "any"),
        EgressRule("10.1.2.3/32")))
    assert meaningful_accepts(fw.host_ruleset([base], "agbr0")) == []
    (a,) = meaningful_accepts(fw.host_ruleset([anyc], "agbr0"))
    assert a.chain == "from_cell" and a.m == {"iifname": ("==", "agbr0.110"),
                                              "ip.saddr": ("==", "10.77.10.2")}
    (o,) = [r for r in meaningful_accepts(fw.cell_ruleset(anyc, [])) if r.chain == "output"]
    assert o.m == {"nfproto": ("==", "ipv4")}  # IPv6 never leaves by egress
    got = [r.m for r in meaningful_accepts(fw.host_ruleset([listed], "br9"))]
    assert got[0]["ip.daddr"] == ("==", {"prefix": {"addr": "192.168.0.0", "len": 16}})
    assert got[0]["tcp.dport"] == ("==", 443) and got[0]["iifname"] == ("==", "br9.110")
    assert all(g["nfproto"] == ("==", "ipv4") for g in got)
    assert got[1]["l4proto"] == ("==", {"set": ["tcp", "udp"]})
    assert got[1]["th.dport"] == ("==", 53) and "ip.daddr" not in got[1]
    assert got[2]["ip.daddr"] == ("==", "10.1.2.3")
    # egress never opens the way to other cells: from_cell sends gateway-bound traffic to
    # cell_to_cell before any egress rule
    host = rules(fw.host_ruleset([listed, anyc], "agbr0"))
    fc = [r for r in host if r.chain == "from_cell"]
    jump = next(i for i, r in enumerate(fc) if r.verdict == "jump:cell_to_cell")
    assert all(i > jump for i, r in enumerate(fc) if r.comment.startswith("egress"))


def test_udp_peer_and_several_ports() -> None:
    srv = CellFw("dns", 100, "10.77.0.3")
    cli = CellFw("cli", 102, "10.77.2.2", peers=(Peer("dns", (53, 5353), "udp"),
                                                  Peer("dns", (853,), "tcp")))
    pairs = [r for r in meaningful_accepts(fw.host_ruleset([srv, cli], "agbr0"))]
    assert sorted(_proto_ports(r)[0] for r in pairs) == ["tcp", "udp"]
    assert {_proto_ports(r)[0]: _proto_ports(r)[1] for r in pairs} == {"udp": {53, 5353},
                                                                      "tcp": {853}}


def test_long_names_keep_comments_within_nft_limit() -> None:
    a, b = "a" * 63, "b" * 63
    cells = [CellFw(a, 100, "10.77.0.2", peers=(Peer(b, tuple(range(1, 40))),)),
             CellFw(b, 101, "10.77.1.2")]
    for batch in (fw.host_ruleset(cells, "agbr0"), fw.cell_ruleset(cells[0], cells)):
        assert all(len(r.comment.encode()) <= fw.COMMENT_MAX for r in rules(batch))


def test_batches_replace_the_table_atomically() -> None:
    web, _ = demo_cells()
    for batch, table in ((fw.host_ruleset([web], "agbr0"), fw.HOST_TABLE),
                         (fw.cell_ruleset(web, []), fw.CELL_TABLE)):
        t = {"family": "inet", "name": table}
        assert batch[:3] == [{"add": {"table": t}}, {"delete": {"table": t}},
                             {"add": {"table": t}}]
        doc = json.loads(fw.batch_json(batch))
        assert doc["nftables"][0] == {"metainfo": {"json_schema_version": 1}}
    assert fw.delete_table("x") == [{"add": {"table": {"family": "inet", "name": "x"}}},
                                    {"delete": {"table": {"family": "inet", "name": "x"}}}]


def test_cellfw_from_manifest() -> None:
    assert cell_firewall(demo("demo-echo"), Allocation(uid_base=1)) is None
    web = cell_firewall(demo("demo-web"), WEB_ALLOC)
    assert web == CellFw("demo-web", 100, "10.77.0.2", gateway="10.77.0.1")
    assert host_way_in(fw.cell_ruleset(CellFw("x", 100, "10.77.0.3"), [])) == []
    with pytest.raises(ValueError):
        CellFw("x", 100, "not-an-address")


# -- property: every accept is a manifest's permission, and every permission is there -----

NAMES = [f"c{i}" for i in range(6)]


@st.composite
def cell_sets(draw: st.DrawFn) -> list[CellFw]:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=6, unique=True))
    cells = []
    for i, name in enumerate(names):
        vlan = draw(st.sampled_from([100, 101, 102]))
        peers = draw(st.lists(st.builds(
            Peer, st.sampled_from([n for n in NAMES if n != name]),
            st.lists(st.integers(1, 65535), min_size=1, max_size=4, unique=True).map(
                lambda p: tuple(sorted(p))),
            st.sampled_from(["tcp", "udp"])), max_size=3))
        egress = draw(st.lists(st.builds(
            EgressRule, st.sampled_from([None, "0.0.0.0/0", "192.168.1.0/24", "8.8.8.8/32"]),
            st.one_of(st.none(), st.integers(1, 65535)),
            st.sampled_from(["tcp", "udp", "any"])), max_size=2))
        cells.append(CellFw(name, vlan, f"10.77.{vlan - 100}.{i + 2}", tuple(peers),
                            draw(st.booleans()), tuple(egress),
                            draw(st.sampled_from(["", f"10.77.{vlan - 100}.1"]))))
    return cells


def _permitted_pair(cells: list[CellFw], src: str, dst: str, proto: str,
                    ports: set[int]) -> bool:
    by_addr = {c.address: c for c in cells}
    c, s = by_addr.get(src), by_addr.get(dst)
    return c is not None and s is not None and any(
        p.cell == s.name and p.proto == proto and set(p.ports) == ports for p in c.peers)


def _permitted_egress(c: CellFw, r: Rule) -> bool:
    if c.egress_any and set(r.m) <= {"iifname", "ip.saddr", "nfproto"}:
        return True
    for e in c.egress:
        want: dict[str, Any] = {}
        if e.cidr is not None:
            want["ip.daddr"] = _addr_right(e.cidr)
        if e.port is not None and e.proto == "any":
            want["th.dport"] = e.port
        elif e.port is not None:
            want[f"{e.proto}.dport"] = e.port
        elif e.proto != "any":
            want["l4proto"] = e.proto
        got = {k: v[1] for k, v in r.m.items()
               if k not in ("iifname", "ip.saddr", "l4proto", "nfproto")
               or (k == "l4proto" and e.port is None)}
        if got == want:
            return True
    return False


def _addr_right(cidr: str) -> Any:
    addr, _, n = cidr.partition("/")
    return addr if n == "32" else {"prefix": {"addr": addr, "len": int(n)}}


@settings(max_examples=150, deadline=None)
@given(cell_sets())
def test_property_accepts_match_manifests(cells: list[CellFw]) -> None:
    by_addr = {c.address: c for c in cells}
    host = fw.host_ruleset(cells, "agbr0")
    json.loads(fw.batch_json(host))
    seen_pairs = set()
    for r in meaningful_accepts(host):
        src = r.m["ip.saddr"][1]
        assert r.m["iifname"] == ("==", f"agbr0.{by_addr[src].vlan}")
        if r.chain == "cell_to_cell":
            proto, ports = _proto_ports(r)
            dst = r.m["ip.daddr"][1]
            assert r.m["oifname"] == ("==", f"agbr0.{by_addr[dst].vlan}")
            assert _permitted_pair(cells, src, dst, proto, ports), r
            seen_pairs.add((src, dst, proto, frozenset(ports)))
        else:
            assert r.chain == "from_cell" and _permitted_egress(by_addr[src], r), r
    names = {c.name: c for c in cells}
    wanted = {(c.address, names[p.cell].address, p.proto, frozenset(p.ports))
              for c in cells for p in c.peers if p.cell in names}
    assert seen_pairs == wanted
    for me in cells:
        batch = fw.cell_ruleset(me, cells)
        json.loads(fw.batch_json(batch))
        assert [r.m for r in host_way_in(batch)] == (
            [{"ip.saddr": ("==", me.gateway)}] if me.gateway else [])
        spoof = [r for r in rules(batch) if r.m.get("ip.saddr", ("",))[0] == "!="]
        assert [r.m["ip.saddr"][1] for r in spoof] == [me.address]  # never the gateway
        for r in meaningful_accepts(batch):
            if r.chain == "input":
                proto, ports = _proto_ports(r)
                assert _permitted_pair(cells, r.m["ip.saddr"][1], me.address, proto, ports)
            else:
                assert r.chain == "output"
                pair = False
                dst = r.m.get("ip.daddr", ("", {}))[1]
                if isinstance(dst, str) and any(k in r.m for k in ("tcp.dport", "udp.dport")):
                    proto, ports = _proto_ports(r)
                    pair = _permitted_pair(cells, me.address, r.m["ip.daddr"][1], proto, ports)
                assert pair or _permitted_egress(me, r), r


# -- the plan step ------------------------------------------------------------------------


@dataclass
class FakeFirewall:
    calls: list[tuple[str, str, int]] = field(default_factory=list)

    def apply_cell(self, cell: str, batch: Sequence[dict[str, Any]]) -> None:
        self.calls.append(("apply", cell, len(batch)))

    def remove_cell(self, cell: str) -> None:
        self.calls.append(("remove", cell, 0))


def _ctx(firewall: Any) -> Context:
    return Context(None, None, None, None, None, firewall)  # type: ignore[arg-type]


def test_plan_places_the_firewall_after_the_link_and_before_the_service() -> None:
    web, _ = demo_cells()
    plan = plan_create(demo("demo-client"), CLIENT_ALLOC, CFG, peers=[web])
    kinds = [type(op) for op in plan.ops]
    i = kinds.index(ApplyCellFirewall)
    assert kinds[i - 1] is MakeLink and kinds[i + 1] is StartService
    op = plan.ops[i]
    assert isinstance(op, ApplyCellFirewall)
    assert op_from_wire(op_to_wire(op)) == op
    assert "peer demo-client -> demo-web 8080/tcp" in op.describe()
    assert any("apply firewall" in line for line in plan.explain())
    # without a firewall (peers=None) and for a loopback-only cell there is no step
    assert ApplyCellFirewall not in [type(o) for o in
                                     plan_create(demo("demo-client"), CLIENT_ALLOC, CFG).ops]
    echo = plan_create(demo("demo-echo"), Allocation(uid_base=100_000), CFG, peers=[web])
    assert ApplyCellFirewall not in [type(o) for o in echo.ops]


def test_apply_cell_firewall_delegates_and_fails_closed() -> None:
    op = ApplyCellFirewall("web", fw.batch_json(fw.cell_ruleset(demo_cells()[0], [])))
    f = FakeFirewall()
    assert op.apply(_ctx(f)) == {}
    op.undo(_ctx(f), {})
    n = len(fw.cell_ruleset(demo_cells()[0], []))
    assert f.calls == [("apply", "web", n), ("remove", "web", 0)]
    with pytest.raises(ConfigError) as exc:
        op.apply(_ctx(None))
    assert exc.value.code == "E_FIREWALL"
    op.undo(_ctx(None), {})  # nothing to undo without a firewall: no error


# -- FirewallSync over a recording nft ------------------------------------------------------


def test_sync_applies_only_what_changed(tmp_path: Path) -> None:
    nft = FakeNft()
    sync = FirewallSync(nft, "agbr0", lambda c: tmp_path / f"cell-{c}")  # type: ignore[arg-type]
    web, client = demo_cells()
    sync.apply_cell("demo-web", fw.cell_ruleset(web, [web]))
    assert sync.refresh([web], ["demo-web"]) == []
    assert nft.applied == [("cell-demo-web", "agent_cell"), (None, "agent_host"),
                           (None, "agent_l2")]
    assert nft.runs == 2  # the host's two tables in one batch, one transaction
    assert sync.refresh([web], ["demo-web"]) == []  # nothing changed: no nft at all
    assert len(nft.applied) == 3 and nft.runs == 2
    # the client arrives: host tables and the web cell's table (new input rule) change
    assert sync.refresh([web, client], ["demo-web"]) == []
    assert nft.applied[3:] == [(None, "agent_host"), (None, "agent_l2"),
                               ("cell-demo-web", "agent_cell")]
    # a failing cell table is reported, the others go on
    nft.fail_netns.add("cell-demo-client")
    errs = sync.refresh([web, client], ["demo-web", "demo-client"])
    assert len(errs) == 1 and "demo-client" in errs[0]
    # no cell left: the host's tables go
    assert sync.refresh([], []) == []
    assert nft.applied[-2:] == [(None, "-agent_host"), (None, "-agent_l2")]
    (tmp_path / "cell-demo-web").touch()
    sync.remove_cell("demo-web")
    assert nft.applied[-1:] == [("cell-demo-web", "-agent_cell")]
    sync.remove_cell("gone")  # no netns: nothing to do
    assert nft.applied[-1:] == [("cell-demo-web", "-agent_cell")]


def test_sync_layer2_failure_is_reported_not_raised(tmp_path: Path) -> None:
    """A kernel without the nftables bridge family loses the layer-2 rules only: the
    forwarding policy still goes in, and the failure comes back as an error."""
    nft = FakeNft(fail_tables={"agent_l2"})
    sync = FirewallSync(nft, "agbr0", lambda c: tmp_path / f"cell-{c}")  # type: ignore[arg-type]
    web, _ = demo_cells()
    errs = sync.refresh([web], [])
    assert nft.applied == [(None, "agent_host")] and nft.runs == 3  # both, host, l2
    assert len(errs) == 1 and "layer-2" in errs[0] and "agent_l2" in errs[0]
    assert len(sync.refresh([web], [])) == 1  # tried again: not remembered as applied
    off = FirewallSync(FakeNft(), "agbr0", lambda c: tmp_path / c, l2=False)  # type: ignore[arg-type]
    assert off.refresh([web], []) == []
    assert off.nft.applied == [(None, "agent_host")]  # type: ignore[attr-defined]


def test_parse_manifest_peers_feed_the_rules() -> None:
    m = parse_manifest('''name = "cli"
[service]
command = "/bin/busybox"
[image]
root = "/img"
[network]
peers = [{ cell = "srv", ports = [80, 81], proto = "udp" }]
egress = ["53/udp"]
''')
    c = CellFw.of(m, 105, "10.77.5.2/24")
    assert c is not None and c.peers == (Peer("srv", (80, 81), "udp"),)
    assert c.egress == (EgressRule(None, 53, "udp"),) and c.address == "10.77.5.2"


def test_a_cells_firewall_view_is_made_once_per_manifest_and_allocation() -> None:
    """The refreshes ask every cell for its CellFw at each start and stop: made once,
    and made again when the manifest or the allocation object is another."""
    import dataclasses

    from agent.core.cell import Cell, CellPolicy
    from agent.daemon.cells import CellEntry

    m = demo("demo-web")
    e = CellEntry(m, Cell.new("demo-web", CellPolicy.from_manifest(m), 0.0), WEB_ALLOC)
    first = e.firewall_view()
    assert first == cell_firewall(m, WEB_ALLOC) and e.firewall_view() is first
    e.alloc = dataclasses.replace(WEB_ALLOC, address="10.77.0.9/24")
    moved = e.firewall_view()
    assert moved is not None and moved.address == "10.77.0.9" and e.firewall_view() is moved
    e.manifest = demo("demo-client")
    assert e.firewall_view() == cell_firewall(demo("demo-client"), e.alloc)
