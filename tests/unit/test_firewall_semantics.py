"""What the generated rulesets do to packets, against a model of the manifests.

Random cell sets (peers, egress, VLANs) and random packets and frames biased to the
interesting values (the cells' own addresses, their peers' ports, forged sources,
neighbour discovery, tags) go through the rules with tests/unit/nfteval.py; the verdict
and the report (log prefix) must be what the model below says.  The model is written
from docs/firewall.md and docs/network.md, not from the generator, so a rule that is
missing, misplaced or too wide shows as a packet with the wrong verdict.  The same
rulesets are checked by the kernel (``nft -c``) in tests/privileged/test_nft_host.py.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from nfteval import Ruleset

from agent.core import firewall as fw
from agent.core import l2fw, netlog
from agent.core.firewall import CellFw
from agent.core.manifest import EgressRule, Peer
from agent.core.names import cell_link_local, cell_mac, veth_names

NAMES = [f"c{i}" for i in range(5)]
OUTSIDE4 = ["8.8.8.8", "192.168.1.5", "10.1.2.3", "10.77.99.9"]
ND_OUT = {"nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-solicit",
          "mld-listener-report", "mld2-listener-report"}
ND_IN = {"nd-neighbor-solicit", "nd-neighbor-advert"}
ICMP6 = sorted(ND_OUT | {"echo-request", "nd-router-advert", "nd-redirect"})


@st.composite
def cell_sets(draw: st.DrawFn) -> list[CellFw]:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=5, unique=True))
    cells = []
    for i, name in enumerate(names):
        vlan = draw(st.sampled_from([100, 101, 102]))
        peers = draw(st.lists(st.builds(
            Peer, st.sampled_from([n for n in NAMES if n != name]),
            st.lists(st.sampled_from([80, 443, 8080, 53, 9000]), min_size=1, max_size=3,
                     unique=True).map(lambda p: tuple(sorted(p))),
            st.sampled_from(["tcp", "udp"])), max_size=3))
        egress = draw(st.lists(st.builds(
            EgressRule, st.sampled_from([None, "0.0.0.0/0", "192.168.1.0/24", "8.8.8.8/32"]),
            st.sampled_from([None, 53, 443]), st.sampled_from(["tcp", "udp", "any"])),
            max_size=2))
        cells.append(CellFw(name, vlan, f"10.77.{vlan - 100}.{i + 2}", tuple(peers),
                            draw(st.booleans()), tuple(egress),
                            draw(st.sampled_from(["", f"10.77.{vlan - 100}.1"]))))
    return cells


# -- the model --------------------------------------------------------------------------


def _peer_ok(cells: list[CellFw], src: str, dst: str, proto: str, port: int | None) -> bool:
    """Does a manifest allow a new connection src -> dst:port/proto?"""
    by_addr = {c.address: c for c in cells}
    c, s = by_addr.get(src), by_addr.get(dst)
    return (c is not None and s is not None and s.name != c.name and port is not None
            and any(p.cell == s.name and p.proto == proto and port in p.ports
                    for p in c.peers))


def _egress_ok(c: CellFw, dst: str, proto: str, port: int | None) -> bool:
    from ipaddress import ip_address, ip_network
    if c.egress_any:
        return True
    for e in c.egress:
        if e.cidr is not None and ip_address(dst) not in ip_network(e.cidr):
            continue
        if e.port is not None and (port is None or e.port != port
                                   or proto not in (("tcp", "udp") if e.proto == "any"
                                                    else (e.proto,))):
            continue
        if e.port is None and e.proto != "any" and proto != e.proto:
            continue
        return True
    return False


# -- packets ---------------------------------------------------------------------------


@st.composite
def ip_packets(draw: st.DrawFn, cells: list[CellFw], me: CellFw) -> dict[str, Any]:
    ports = sorted({p for c in cells for peer in c.peers for p in peer.ports} | {22, 53, 443})
    pkt: dict[str, Any] = {"ct.state": ["new"], "meta.iifname": "eth0",
                           "meta.oifname": "eth0",
                           "meta.pkttype": draw(st.sampled_from(["host", "host", "broadcast"]))}
    if draw(st.booleans()):
        addrs = [c.address for c in cells] + [c.gateway for c in cells if c.gateway] + OUTSIDE4
        proto = draw(st.sampled_from(["tcp", "udp", "icmp"]))
        pkt.update({"meta.nfproto": "ipv4", "meta.l4proto": proto,
                    "ip.saddr": draw(st.sampled_from([me.address] * 4 + addrs)),
                    "ip.daddr": draw(st.sampled_from(addrs))})
    else:
        lls = [cell_link_local(c.name) for c in cells] + ["fe80::1", "2001:db8::5"]
        proto = draw(st.sampled_from(["tcp", "udp", "ipv6-icmp", "ipv6-icmp"]))
        pkt.update({"meta.nfproto": "ipv6", "meta.l4proto": proto,
                    "ip6.saddr": draw(st.sampled_from(
                        [cell_link_local(me.name)] * 3 + ["::"] + lls)),
                    "ip6.daddr": draw(st.sampled_from([*lls, "ff02::1"])),
                    "ip6.hoplimit": draw(st.sampled_from([255, 64, 1]))})
        if proto == "ipv6-icmp":
            pkt["icmpv6.type"] = draw(st.sampled_from(ICMP6))
    if proto in ("tcp", "udp"):
        port = draw(st.sampled_from(ports))
        pkt.update({f"{proto}.dport": port, "th.dport": port})
    return pkt


def _cell_out_model(cells: list[CellFw], me: CellFw, p: dict[str, Any]) -> tuple[str, str]:
    """(verdict, report) for a new packet leaving ``me``."""
    proto = p["meta.l4proto"]
    port = p.get("th.dport")
    if p["meta.nfproto"] == "ipv4":
        if p["ip.saddr"] != me.address:
            return "drop", netlog.CELL_SPOOF
        if _peer_ok(cells, me.address, p["ip.daddr"], proto, port):
            return "accept", ""
        if _egress_ok(me, p["ip.daddr"], proto, port):
            return "accept", ""
        return "drop", netlog.CELL_OUT
    src = p["ip6.saddr"]
    if src not in (cell_link_local(me.name), "::") or (src == "::" and proto != "ipv6-icmp"):
        return "drop", netlog.CELL_SPOOF
    if proto == "ipv6-icmp" and p["icmpv6.type"] in ND_OUT:
        return "accept", ""
    return "drop", netlog.CELL_OUT  # no IPv6 beyond the link's own business


def _cell_in_model(cells: list[CellFw], me: CellFw, p: dict[str, Any]) -> tuple[str, str]:
    proto, port = p["meta.l4proto"], p.get("th.dport")
    report = netlog.CELL_IN if p["meta.pkttype"] == "host" else ""
    if p["meta.nfproto"] == "ipv6":
        nd = proto == "ipv6-icmp" and p["icmpv6.type"] in ND_IN and p["ip6.hoplimit"] == 255
        return ("accept", "") if nd else ("drop", report)
    if me.gateway and p["ip.saddr"] == me.gateway:
        return "accept", ""
    # a client's rule names its source and the port (the netns has one address)
    if _peer_ok(cells, p["ip.saddr"], me.address, proto, port):
        return "accept", ""
    return "drop", report


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_cell_tables_do_what_the_manifests_say(data: st.DataObject) -> None:
    cells = data.draw(cell_sets())
    me = data.draw(st.sampled_from(cells))
    rs = Ruleset(fw.cell_ruleset(me, cells))
    for _ in range(20):
        p = data.draw(ip_packets(cells, me))
        res = rs.run("output", p)
        want = _cell_out_model(cells, me, p)
        assert (res.verdict, res.logs[-1] if res.logs else "") == want, (p, res)
        res = rs.run("input", p)
        want = _cell_in_model(cells, me, p)
        assert (res.verdict, res.logs[-1] if res.logs else "") == want, (p, res)


def test_forged_ipv6_source_never_leaves_a_cell() -> None:
    """The gap this closes: with ``egress = true`` or a port-only egress rule, IPv6 with
    any source used to pass the output chain."""
    me = CellFw("c0", 100, "10.77.0.2", egress_any=True,
                egress=(EgressRule(None, 53, "udp"),))
    rs = Ruleset(fw.cell_ruleset(me, [me]))
    base = {"ct.state": ["new"], "meta.oifname": "eth0", "meta.iifname": "eth0",
            "meta.pkttype": "host", "meta.nfproto": "ipv6", "meta.l4proto": "udp",
            "ip6.daddr": "fe80::1", "ip6.hoplimit": 64, "udp.dport": 53, "th.dport": 53}
    for src in ("fe80::dead", "2001:db8::1", "::", cell_link_local("c1")):
        res = rs.run("output", {**base, "ip6.saddr": src})
        assert (res.verdict, res.logs) == ("drop", [netlog.CELL_SPOOF]), src
    # the control: its own link-local source is no spoof, and IPv6 still has no egress
    res = rs.run("output", {**base, "ip6.saddr": cell_link_local("c0")})
    assert (res.verdict, res.logs) == ("drop", [netlog.CELL_OUT])
    nd = {**base, "meta.l4proto": "ipv6-icmp", "icmpv6.type": "nd-neighbor-solicit",
          "ip6.saddr": cell_link_local("c0"), "ip6.hoplimit": 255}
    del nd["udp.dport"], nd["th.dport"]
    assert rs.run("output", nd).verdict == "accept"


# -- the host's forwarding table -----------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_host_table_does_what_the_manifests_say(data: st.DataObject) -> None:
    cells = data.draw(cell_sets())
    rs = Ruleset(fw.host_ruleset(cells, "agbr0"))
    by_addr = {c.address: c for c in cells}
    for _ in range(20):
        src = data.draw(st.sampled_from(cells))
        p = data.draw(ip_packets(cells, src))
        iif = f"agbr0.{data.draw(st.sampled_from([src.vlan] * 3 + [100, 101, 102]))}"
        dst_cell = by_addr.get(p.get("ip.daddr", ""))
        oif = data.draw(st.sampled_from(
            ([f"agbr0.{dst_cell.vlan}"] * 3 if dst_cell else []) + ["eth9", "agbr0.102"]))
        p.update({"meta.iifname": iif, "meta.oifname": oif})
        res = rs.run("forward", p)
        proto, port = p["meta.l4proto"], p.get("th.dport")
        sender = by_addr.get(p.get("ip.saddr", ""))
        if p["meta.nfproto"] == "ipv6":
            want = "drop"
        elif oif.startswith("agbr0."):
            want = "accept" if (
                sender is not None and dst_cell is not None and iif == f"agbr0.{sender.vlan}"
                and oif == f"agbr0.{dst_cell.vlan}"
                and _peer_ok(cells, sender.address, dst_cell.address, proto, port)) else "drop"
        else:
            want = "accept" if (sender is not None and iif == f"agbr0.{sender.vlan}"
                                and _egress_ok(sender, p["ip.daddr"], proto, port)) else "drop"
        assert res.verdict == want, (p, res)
        reported = want == "drop" and sender is not None and p["meta.pkttype"] == "host"
        assert res.logs == ([netlog.HOST_DENY] if reported else []), (p, res)
        # a cell to the host itself: nothing new but neighbour discovery
        res = rs.run("input", p | {"meta.iifname": iif})
        nd = (p["meta.nfproto"] == "ipv6" and p["meta.l4proto"] == "ipv6-icmp"
              and p["icmpv6.type"] in ND_IN and p["ip6.hoplimit"] == 255)
        assert res.verdict == ("accept" if nd else "drop"), (p, res)
        # the host's other traffic is not touched
        other = p | {"meta.iifname": "eth9", "meta.oifname": "eth8"}
        assert rs.run("forward", other).verdict == "accept"
        assert rs.run("input", other).verdict == "accept"


# -- the bridge's layer-2 rules ------------------------------------------------------------


@st.composite
def frames(draw: st.DrawFn, cells: list[CellFw]) -> tuple[dict[str, Any], CellFw | None]:
    c: CellFw | None = draw(st.sampled_from([*cells, None]))
    name = c.name if c is not None else "stranger"
    macs = [cell_mac(x.name) for x in cells] + ["02:00:00:00:00:99"]
    own = cell_mac(name)
    f: dict[str, Any] = {"meta.iifname": draw(st.sampled_from(
        [veth_names(name)[0]] * 4 + ["eth1"])),
        "ether.saddr": draw(st.sampled_from([own] * 4 + macs))}
    kind = draw(st.sampled_from(["ip", "arp", "ip6", "8021q", "8021ad", 0x9100, "lldp"]))
    addrs = [x.address for x in cells] + ["10.77.0.1", "0.0.0.0"]
    if kind == "lldp":
        f["ether.type"] = 0x88CC
    else:
        f["ether.type"] = kind
    if kind == "arp":
        f["arp.saddr ether"] = draw(st.sampled_from([own] * 3 + macs))
        f["arp.saddr ip"] = draw(st.sampled_from(([c.address] * 3 if c else []) + addrs))
    elif kind == "ip":
        proto = draw(st.sampled_from(["tcp", "udp"]))
        f.update({"ip.saddr": draw(st.sampled_from(([c.address] * 3 if c else []) + addrs)),
                  "meta.l4proto": proto})
        if proto == "udp":
            f["udp.sport"] = draw(st.sampled_from([67, 68, 53, 547]))
    elif kind == "ip6":
        proto = draw(st.sampled_from(["udp", "ipv6-icmp"]))
        f.update({"ip6.saddr": draw(st.sampled_from(
            [cell_link_local(name)] * 3 + ["::", "fe80::1", "2001:db8::1"]
            + [cell_link_local(x.name) for x in cells])), "meta.l4proto": proto})
        if proto == "udp":
            f["udp.sport"] = draw(st.sampled_from([547, 546, 5353]))
        else:
            f["icmpv6.type"] = draw(st.sampled_from(ICMP6))
    return f, c


def _l2_model(f: dict[str, Any], c: CellFw | None) -> tuple[str, str]:
    """(verdict, reason) for a frame from a cell port, in the documented order."""
    port = f["meta.iifname"]
    if c is None or not port.startswith("vc-"):
        return "accept", ""  # no cell port of the agent's: not its business
    mac, ll, t = cell_mac(c.name), cell_link_local(c.name), f["ether.type"]
    checks = [
        ("mac", f["ether.saddr"] != mac),
        ("vlan", t in ("8021q", "8021ad", 0x9100)),
        ("arp", t == "arp" and (f["arp.saddr ether"] != mac or f["arp.saddr ip"] != c.address)),
        ("dhcp", f.get("udp.sport") in (67, 547)),
        ("ra", f.get("icmpv6.type") in ("nd-router-advert", "nd-redirect")),
        ("ip", t == "ip" and f["ip.saddr"] != c.address),
        ("ip6", t == "ip6" and f["ip6.saddr"] == "::" and f["meta.l4proto"] != "ipv6-icmp"),
        ("ip6", t == "ip6" and f["ip6.saddr"] not in (ll, "::")),
        ("proto", t not in ("ip", "arp", "ip6")),
    ]
    for reason, hit in checks:
        if hit:
            return "drop", reason
    return "accept", ""


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_layer2_rules_drop_and_report_each_abuse(data: st.DataObject) -> None:
    cells = data.draw(cell_sets())
    rs = Ruleset(l2fw.l2_ruleset(cells))
    for _ in range(25):
        f, c = data.draw(frames(cells))
        res = rs.run("prerouting", f)
        verdict, reason = _l2_model(f, c)
        assert res.verdict == verdict, (f, res)
        if reason:
            assert c is not None and res.logs == [netlog.l2_prefix(reason, c.name)], (f, res)
        else:
            assert res.logs == [], (f, res)


def test_layer2_own_traffic_passes_for_every_kind() -> None:
    """The controls: each cell's own ARP, IPv4, IPv6 (link-local and DAD) frames pass."""
    a = CellFw("a", 100, "10.77.0.2")
    rs = Ruleset(l2fw.l2_ruleset([a, CellFw("b", 100, "10.77.0.3")]))
    base = {"meta.iifname": veth_names("a")[0], "ether.saddr": cell_mac("a")}
    own = [
        {"ether.type": "arp", "arp.saddr ether": cell_mac("a"), "arp.saddr ip": "10.77.0.2"},
        {"ether.type": "ip", "ip.saddr": "10.77.0.2", "meta.l4proto": "udp", "udp.sport": 68},
        {"ether.type": "ip6", "ip6.saddr": cell_link_local("a"), "meta.l4proto": "ipv6-icmp",
         "icmpv6.type": "nd-neighbor-solicit"},
        {"ether.type": "ip6", "ip6.saddr": "::", "meta.l4proto": "ipv6-icmp",
         "icmpv6.type": "nd-neighbor-solicit"},
    ]
    for f in own:
        assert rs.run("prerouting", base | f).verdict == "accept", f
    # b's MAC or address from a's port is a spoof
    assert rs.run("prerouting", base | own[0] | {"arp.saddr ip": "10.77.0.3"}).logs == [
        netlog.l2_prefix("arp", "a")]
    assert rs.run("prerouting", base | own[1] | {"ether.saddr": cell_mac("b")}).logs == [
        netlog.l2_prefix("mac", "a")]
    # a port of no cell (another bridge's, a test's) is not touched
    other = base | own[1] | {"meta.iifname": veth_names("zz")[0],
                             "ether.saddr": "02:00:00:00:00:09"}
    assert rs.run("prerouting", other).verdict == "accept"
    assert Ruleset(l2fw.l2_ruleset([])).run("prerouting", other).verdict == "accept"
