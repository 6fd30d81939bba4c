"""Manifests -> nftables rulesets (channels 1 and 3), purely.  docs/firewall.md has the model.

Two kinds of table, both generated here as nft JSON batches and applied whole, in one
transaction, by agent.kernel.nft:

* ``inet agent_cell`` in each networked cell's netns (channel 1).  ``input`` accepts new
  connections only from the cells whose manifests name this cell as a peer, to the ports
  they name, and from the host itself (the cell's gateway address: agentd, operator
  tools; a cell can never use that source, see ``output``); ``output`` lets the cell
  open connections only to its own peers' addresses and ports, plus what
  ``network.egress`` allows (IPv4 only).  Both chains drop everything else, and
  ``output`` drops packets whose source is not the cell's own address, or for IPv6 its
  link-local address (anti-spoofing); IPv6 beyond neighbour discovery never leaves.
* ``inet agent_host`` in the host's netns (channel 3), for traffic routed between the
  VLAN gateways ``<bridge>.N``: each allowed pair (client -> server address:port/proto),
  cell -> outside only with egress, nothing from outside into cells or from cells to the
  host itself except replies.  Other host traffic is not touched (policy accept, and only
  packets entering or leaving a gateway interface jump into the agent's chains).

Refused packets are reported through rate-limited NFLOG rules (agent.core.netlog,
docs/channel3.md).  A peer whose cell does not exist has no address, so it gets no
rule; the master regenerates both kinds of table whenever cells come and go
(agent.kernel.nft.FirewallSync).
A whole table's batch starts with ``add table`` + ``delete table`` so it replaces the
table atomically whether or not it existed.  The host's table is built in sections
(agent.core.nftsections), so that a cell coming or going changes only its own chains and
map elements: the cost of a start does not grow with the cells already running.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import Literal

from agent.core import netlog, nftjson
from agent.core.manifest import EgressRule, Manifest, Peer
from agent.core.names import cell_link_local
from agent.core.nftjson import (
    ACCEPT,
    COMMENT_MAX,
    COUNTER,
    CT_INVALID,
    CT_OK,
    DROP,
    Batch,
    Json,
    ip_match,
    jump,
    log_limited,
    match,
    meta,
    payload,
    ports_match,
)
from agent.core.nftsections import SectionCache, Sectioned

__all__ = [
    "CELL_TABLE",
    "COMMENT_MAX",
    "FAMILY",
    "HOST_TABLE",
    "CellFw",
    "Flow",
    "allowed_flows",
    "batch_json",
    "cell_ruleset",
    "delete_table",
    "host_ruleset",
    "host_tables",
    "related_cells",
]

FAMILY = "inet"
CELL_TABLE = "agent_cell"
HOST_TABLE = "agent_host"

Proto = Literal["tcp", "udp"]


@dataclass(frozen=True)
class CellFw:
    """What the firewall needs to know about one networked cell."""

    name: str
    vlan: int
    address: str  # without prefix, e.g. 10.77.0.2
    peers: tuple[Peer, ...] = ()
    egress_any: bool = False
    egress: tuple[EgressRule, ...] = ()
    gateway: str = ""  # the host's address on the cell's VLAN ("": host gets no access)

    def __post_init__(self) -> None:
        IPv4Address(self.address)  # ValueError for anything else
        if self.gateway:
            IPv4Address(self.gateway)

    @classmethod
    def of(cls, m: Manifest, vlan: int | None, address: str | None,
           gateway: str | None = None) -> CellFw | None:
        """``None`` for a loopback-only cell (no [network], or no lease)."""
        if m.network is None or vlan is None or not address:
            return None
        n = m.network
        return cls(m.name, vlan, str(IPv4Interface(address).ip), n.peers, n.egress_any,
                   n.egress, str(IPv4Interface(gateway).ip) if gateway else "")


@dataclass(frozen=True)
class Flow:
    """New connections ``client`` -> ``server`` on ``ports``/``proto`` (a manifest's peer)."""

    client: str
    client_addr: str
    client_vlan: int
    server: str
    server_addr: str
    server_vlan: int
    proto: Proto
    ports: tuple[int, ...]


def allowed_flows(cells: Iterable[CellFw]) -> list[Flow]:
    """Every (client, server, proto, ports) a manifest allows between existing cells."""
    by_name = {c.name: c for c in cells}
    flows: list[Flow] = []
    for c in sorted(by_name.values(), key=lambda c: c.name):
        for p in c.peers:
            s = by_name.get(p.cell)
            if s is None or s.name == c.name:
                continue
            flows.append(Flow(c.name, c.address, c.vlan, s.name, s.address, s.vlan, p.proto,
                              tuple(sorted(set(p.ports)))))
    return flows


def related_cells(cells: Iterable[CellFw]) -> dict[str, set[CellFw]]:
    """For each cell, the other cells its own table depends on: those it names as a
    peer and those that name it (:func:`cell_ruleset` of a cell and these alone is the
    same as with every cell)."""
    by_name = {c.name: c for c in cells}
    out: dict[str, set[CellFw]] = {}
    for f in allowed_flows(by_name.values()):
        out.setdefault(f.client, set()).add(by_name[f.server])
        out.setdefault(f.server, set()).add(by_name[f.client])
    return out


def _portlist(f: Flow) -> str:
    return ",".join(map(str, f.ports)) + "/" + f.proto


IPV4 = meta("nfproto", "ipv4")
IPV6 = meta("nfproto", "ipv6")
# Neighbour discovery a cell may send (its own link-local or "::" as source: the spoof
# rules come first) and receive; untracked by conntrack, so never a "reply".
ND_OUT = ["nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-solicit",
          "mld-listener-report", "mld2-listener-report"]
ND_IN = ["nd-neighbor-solicit", "nd-neighbor-advert"]


def _nd(types: list[str], hop255: bool = True) -> list[Json]:
    # RFC 4861: neighbour discovery is only valid with a hop limit of 255, so what comes
    # in cannot have been routed from anywhere.  (MLD reports go out with 1.)
    out = [match(payload("icmpv6", "type"), {"set": types})]
    return [*out, match(payload("ip6", "hoplimit"), 255)] if hop255 else out


def _egress_exprs(e: EgressRule) -> list[Json]:
    """What an egress rule matches.  IPv4 only: a cell has no IPv6 address beyond its
    link-local one, so IPv6 egress could only ever reach its own VLAN (other cells)."""
    out: list[Json] = [IPV4]
    if e.cidr is not None:
        out.append(ip_match("daddr", e.cidr))
    if e.port is not None:
        if e.proto == "any":
            out += [meta("l4proto", {"set": ["tcp", "udp"]}),
                    match(payload("th", "dport"), e.port)]
        else:
            out.append(ports_match(e.proto, [e.port]))
    elif e.proto != "any":
        out.append(meta("l4proto", e.proto))
    return out


def _log(prefix: str, group: int) -> list[Json]:
    return log_limited(group, prefix, netlog.RATE, netlog.BURST)


def cell_ruleset(me: CellFw, cells: Iterable[CellFw],
                 group: int = netlog.LOG_GROUP) -> list[Json]:
    """The batch that (re)makes ``inet agent_cell`` in ``me``'s netns.

    ``cells`` are the other cells that exist (``me`` among them or not): they give the
    addresses of ``me``'s peers and of the clients that name ``me`` as their peer.
    Drops worth an event are logged to NFLOG ``group`` in the cell's netns, rate-limited
    (agent.core.netlog: ``agent:in``, ``agent:out``, ``agent:spoof``).
    """
    others = {c.name: c for c in cells if c.name != me.name}
    everyone = [me, *others.values()]
    ll = cell_link_local(me.name)
    b = Batch(FAMILY, CELL_TABLE)
    b.chain("input", "input", "drop")
    b.chain("output", "output", "drop")
    b.chain("spoof")
    for chain, dev in (("input", "iifname"), ("output", "oifname")):
        b.rule(chain, meta(dev, "lo"), ACCEPT, comment="loopback")
        b.rule(chain, CT_OK, ACCEPT, comment="replies")
        b.rule(chain, CT_INVALID, COUNTER, DROP, comment="invalid")
    b.rule("input", *_nd(ND_IN), ACCEPT, comment="neighbour discovery")
    if me.gateway:
        b.rule("input", ip_match("saddr", me.gateway), ACCEPT, comment="from the host")
    for f in allowed_flows(everyone):
        if f.server == me.name:
            b.rule("input", ip_match("saddr", f.client_addr), ports_match(f.proto, f.ports),
                   ACCEPT, comment=f"peer {f.client} -> {f.server} {_portlist(f)}")
    b.rule("input", meta("pkttype", "host"), *_log(netlog.CELL_IN, group),
           comment="report unicast refused")
    b.drop_counted("input", "drop in")
    # no spoofing, in either family: the cell's own address, its link-local address,
    # and "::" (duplicate address detection, MLD) for ICMPv6 only
    b.rule("output", IPV4, ip_match("saddr", me.address, "!="), jump("spoof"),
           comment="spoofed source")
    b.rule("output", IPV6, match(payload("ip6", "saddr"), {"set": [ll, "::"]}, "!="),
           jump("spoof"), comment="spoofed source (ipv6)")
    b.rule("output", IPV6, match(payload("ip6", "saddr"), "::"),
           meta("l4proto", "ipv6-icmp", "!="), jump("spoof"),
           comment="unspecified source (ipv6)")
    b.rule("spoof", *_log(netlog.CELL_SPOOF, group), comment="report spoofed source")
    b.drop_counted("spoof", "drop spoofed")
    b.rule("output", *_nd(ND_OUT, hop255=False), ACCEPT, comment="neighbour discovery")
    for f in allowed_flows(everyone):
        if f.client == me.name:
            b.rule("output", ip_match("daddr", f.server_addr), ports_match(f.proto, f.ports),
                   ACCEPT, comment=f"peer {f.client} -> {f.server} {_portlist(f)}")
    if me.egress_any:
        b.rule("output", IPV4, ACCEPT, comment="egress any")
    for e in me.egress:
        b.rule("output", *_egress_exprs(e), ACCEPT, comment=f"egress {e}")
    b.rule("output", *_log(netlog.CELL_OUT, group), comment="report refused")
    b.drop_counted("output", "drop out")
    return b.cmds


EGRESS_MAP = "egress"  # (cell address . its VLAN's gateway) -> jump egress_<cell>
PEERS_MAP = "peers"  # the same key -> jump peers_<cell> (its flows to other cells)
DENY_MAP = "deny_src"  # cell address -> jump log_<cell> (its own report limit)


def _by_cell() -> Json:
    """The key of the per-cell maps: the source address and the gateway it came in by."""
    return {"concat": [payload("ip", "saddr"), {"meta": {"key": "iifname"}}]}


def host_tables(cells: Iterable[CellFw], bridge: str, group: int = netlog.LOG_GROUP,
                cache: SectionCache | None = None) -> Sectioned:
    """``inet agent_host`` in the host netns, as a base and a section per cell
    (agent.core.nftsections): a cell's egress rules, its flows to other cells (as the
    client) and its report chain are chains of its own, reached through the named maps
    ``egress``, ``peers`` and ``deny_src``.

    Every refused packet from a cell (to another cell, outside, or the host itself) is
    reported to NFLOG ``group`` (``agent:deny``) through the chain of its source cell,
    whose ``limit`` bounds that cell's share of the reports.  ``cache``: sections made
    by the last call, reused for a cell whose own part is the same (and left there for
    the next call)."""
    gw = f"{bridge}.*"
    cells = sorted(cells, key=lambda c: c.name)
    b = Sectioned(FAMILY, HOST_TABLE)
    b.chain("forward", "forward", "accept")
    b.chain("input", "input", "accept")
    for name in ("from_cell", "cell_to_cell", "into_cell", "cell_to_host", "deny_log"):
        b.chain(name)
    b.verdict_map(EGRESS_MAP, ["ipv4_addr", "ifname"])
    b.verdict_map(PEERS_MAP, ["ipv4_addr", "ifname"])
    b.verdict_map(DENY_MAP, "ipv4_addr")
    b.rule("forward", meta("iifname", gw), jump("from_cell"), comment="routed from a cell")
    b.rule("forward", meta("oifname", gw), jump("into_cell"),
           comment="routed into a cell from outside")
    b.rule("input", meta("iifname", gw), jump("cell_to_host"), comment="a cell to the host itself")
    for chain in ("from_cell", "into_cell", "cell_to_host"):
        b.rule(chain, CT_OK, ACCEPT, comment="replies")
        b.rule(chain, CT_INVALID, COUNTER, DROP, comment="invalid")
    b.rule("cell_to_host", *_nd(ND_IN), ACCEPT, comment="neighbour discovery")
    b.rule("from_cell", meta("oifname", gw), jump("cell_to_cell"), comment="between VLANs")
    b.rule("cell_to_cell", {"vmap": {"key": _by_cell(), "data": f"@{PEERS_MAP}"}},
           comment="the source cell's flows to its peers")
    b.rule("cell_to_cell", jump("deny_log"), comment="report")
    b.drop_counted("cell_to_cell", "drop cell to cell")
    b.rule("from_cell", {"vmap": {"key": _by_cell(), "data": f"@{EGRESS_MAP}"}},
           comment="the source cell's egress")
    b.rule("from_cell", jump("deny_log"), comment="report")
    b.drop_counted("from_cell", "drop egress")
    b.drop_counted("into_cell", "drop into cell")
    b.rule("cell_to_host", jump("deny_log"), comment="report")
    b.drop_counted("cell_to_host", "drop cell to host")
    # reports: unicast only (a cell's broadcasts and router solicitations are no
    # attempt at anything), each cell through a chain of its own (its own limit)
    b.rule("deny_log", meta("pkttype", "host", "!="), {"return": None}, comment="unicast only")
    b.rule("deny_log", {"vmap": {"key": payload("ip", "saddr"), "data": f"@{DENY_MAP}"}},
           comment="by source cell")
    flows: dict[str, list[Flow]] = {}
    for f in allowed_flows(cells):
        flows.setdefault(f.client, []).append(f)
    for c in cells:
        mine = flows.get(c.name, [])

        def build(c: CellFw = c, mine: list[Flow] = mine) -> None:
            _host_section(b, c, mine, bridge, group)

        b.cached(c.name, (c, tuple(mine), bridge, group), cache, build)
    return b.keep(cache)


def _host_section(b: Sectioned, c: CellFw, mine: list[Flow], bridge: str, group: int) -> None:
    """Cell ``c``'s part of the host table: its report chain, its flows as the client
    (``mine``), its egress; each reached through its element of a map."""
    key = {"concat": [c.address, f"{bridge}.{c.vlan}"]}
    b.chain(f"log_{c.name}")
    b.rule(f"log_{c.name}", *_log(netlog.HOST_DENY, group), comment=f"report {c.name}")
    b.element(DENY_MAP, c.address, jump(f"log_{c.name}"))
    if mine:
        b.chain(f"peers_{c.name}")
        for f in mine:
            b.rule(f"peers_{c.name}", meta("oifname", f"{bridge}.{f.server_vlan}"),
                   ip_match("daddr", f.server_addr), ports_match(f.proto, f.ports),
                   ACCEPT, comment=f"peer {f.client} -> {f.server} {_portlist(f)}")
        b.element(PEERS_MAP, key, jump(f"peers_{c.name}"))
    if c.egress_any or c.egress:
        b.chain(f"egress_{c.name}")
        if c.egress_any:
            b.rule(f"egress_{c.name}", ACCEPT, comment=f"egress {c.name} any")
        for e in c.egress:
            b.rule(f"egress_{c.name}", *_egress_exprs(e), ACCEPT,
                   comment=f"egress {c.name} {e}")
        b.element(EGRESS_MAP, key, jump(f"egress_{c.name}"))


def host_ruleset(cells: Iterable[CellFw], bridge: str,
                 group: int = netlog.LOG_GROUP) -> list[Json]:
    """The batch that (re)makes ``inet agent_host`` whole (:func:`host_tables`)."""
    return host_tables(cells, bridge, group).full()


def delete_table(table: str) -> list[Json]:
    """A batch removing ``inet <table>``; succeeds when it does not exist."""
    return nftjson.delete_table(table, FAMILY)


batch_json = nftjson.batch_json
