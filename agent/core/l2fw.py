"""Layer-2 rules on the cells' bridge ports (channel 3), purely: cells -> one nft batch.

``bridge agent_l2`` in the host's netns sees every frame a cell sends, at the bridge's
prerouting hook, before the bridge forwards it or hands it to a VLAN gateway, and before
anything a cell can change (its netns holds no part of it).  Each cell port
(``vc-<hash>``, agent.core.names.veth_names) jumps, through one ``iifname`` verdict map, to
the cell's own chain (an element of the ``ports`` map, added with the cell's chains as one
section: agent.core.nftsections), which drops and reports (docs/network.md, "Layer-2 rules"):

=========  =======================================================================
reason     frames dropped
=========  =======================================================================
``mac``    source MAC other than the cell's (agent.core.names.cell_mac: the agent
           sets it on the cell's ``eth0``)
``vlan``   802.1Q / 802.1ad / QinQ tagged frames (VLAN hopping, double tagging)
``arp``    ARP whose sender MAC or sender IP is not the cell's
``dhcp``   DHCP server messages (UDP source port 67) and DHCPv6 server messages (547)
``ra``     ICMPv6 router advertisements and redirects
``ip``     IPv4 with a source other than the cell's address
``ip6``    IPv6 with a source other than the cell's link-local address
           (agent.core.names.cell_link_local), or the unspecified address ``::``
           for anything but ICMPv6 (duplicate address detection, MLD)
``proto``  any other ethertype
=========  =======================================================================

Each (cell, reason) has a chain of two rules: a rate-limited NFLOG rule whose prefix
names the reason and the cell (agent.core.netlog) and a counted drop.  Only the agent's
cell ports are matched (by name), so other bridges of the box are not touched.  Frames
the rules let through go on to the bridge's VLAN filtering and, between VLANs, to the host's
forwarding table (agent.core.firewall).
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.core import netlog
from agent.core.firewall import CellFw
from agent.core.names import cell_link_local, cell_mac, veth_names
from agent.core.nftjson import (
    ACCEPT,
    COUNTER,
    DROP,
    Batch,
    Json,
    goto,
    jump,
    log_limited,
    match,
    meta,
    payload,
)
from agent.core.nftsections import SectionCache, Sectioned

__all__ = ["FAMILY", "L2_TABLE", "PORTS_MAP", "PRIO", "l2_ruleset", "l2_tables", "port_chain"]

FAMILY = "bridge"
L2_TABLE = "agent_l2"
PRIO = -200  # the bridge family's "filter" priority
PORTS_MAP = "ports"  # cell port name -> jump to the cell's chain
VLAN_TYPES = ["8021q", "8021ad", 0x9100]  # 0x9100: the old QinQ outer tag
ND_UNSPECIFIED_OK = "ipv6-icmp"  # what may come from "::" (DAD, MLD reports)


def port_chain(cell: str) -> str:
    return f"port_{cell}"


def _drop_chain(cell: str, reason: str) -> str:
    return f"drop_{cell}_{reason}"


def _cell_rules(b: Batch, c: CellFw, group: int) -> None:
    chain = port_chain(c.name)
    mac, ll = cell_mac(c.name), cell_link_local(c.name)
    for reason in netlog.L2_REASONS:  # chains first: a rule may only name a chain that exists
        d = _drop_chain(c.name, reason)
        b.chain(d)
        b.rule(d, *log_limited(group, netlog.l2_prefix(reason, c.name), netlog.RATE,
                               netlog.BURST), comment=f"report {reason}")
        b.rule(d, COUNTER, DROP, comment=f"drop {reason}")
    b.chain(chain)

    def drop_if(reason: str, *cond: Json, comment: str) -> None:
        b.rule(chain, *cond, goto(_drop_chain(c.name, reason)), comment=comment)

    drop_if("mac", match(payload("ether", "saddr"), mac, "!="),
            comment=f"{c.name}: source MAC not {mac}")
    drop_if("vlan", match(payload("ether", "type"), {"set": VLAN_TYPES}),
            comment=f"{c.name}: tagged frame")
    drop_if("arp", match(payload("arp", "saddr ether"), mac, "!="),
            comment=f"{c.name}: ARP sender MAC not {mac}")
    drop_if("arp", match(payload("arp", "saddr ip"), c.address, "!="),
            comment=f"{c.name}: ARP sender IP not {c.address}")
    drop_if("dhcp", match(payload("udp", "sport"), {"set": [67, 547]}),
            comment=f"{c.name}: DHCP server message")
    drop_if("ra", match(payload("icmpv6", "type"),
                        {"set": ["nd-router-advert", "nd-redirect"]}),
            comment=f"{c.name}: router advertisement or redirect")
    drop_if("ip", match(payload("ip", "saddr"), c.address, "!="),
            comment=f"{c.name}: IPv4 source not {c.address}")
    drop_if("ip6", match(payload("ip6", "saddr"), "::"),
            meta("l4proto", ND_UNSPECIFIED_OK, "!="),
            comment=f"{c.name}: unspecified IPv6 source beyond ICMPv6")
    drop_if("ip6", match(payload("ip6", "saddr"), {"set": [ll, "::"]}, "!="),
            comment=f"{c.name}: IPv6 source not {ll}")
    drop_if("proto", match(payload("ether", "type"), {"set": ["ip", "arp", "ip6"]}, "!="),
            comment=f"{c.name}: ethertype other than IPv4, ARP, IPv6")
    b.rule(chain, ACCEPT, comment=f"{c.name}: its own frame")


def l2_tables(cells: Iterable[CellFw], group: int = netlog.LOG_GROUP,
              cache: SectionCache | None = None) -> Sectioned:
    """``bridge agent_l2`` for the networked cells ``cells``: a section per cell (its
    chains and its port's element of the ``ports`` map; agent.core.nftsections), taken
    from ``cache`` when it holds one for the same cell (and left there for the next)."""
    b = Sectioned(FAMILY, L2_TABLE)
    b.chain("prerouting", "prerouting", "accept", PRIO)
    b.verdict_map(PORTS_MAP, "ifname")
    b.rule("prerouting", {"vmap": {"key": {"meta": {"key": "iifname"}},
                                   "data": f"@{PORTS_MAP}"}},
           comment="each cell port to its chain")
    for c in sorted(cells, key=lambda c: c.name):
        def build(c: CellFw = c) -> None:
            _cell_rules(b, c, group)
            b.element(PORTS_MAP, veth_names(c.name)[0], jump(port_chain(c.name)))

        b.cached(c.name, (c.name, c.address, group), cache, build)
    return b.keep(cache)


def l2_ruleset(cells: Iterable[CellFw], group: int = netlog.LOG_GROUP) -> list[Json]:
    """The batch that (re)makes ``bridge agent_l2`` whole for ``cells``."""
    return l2_tables(cells, group).full()
