"""Manifests -> nftables rulesets (channels 1 and 3), purely.  docs/firewall.md has the model.

Two kinds of table, both generated here as nft JSON batches and applied whole, in one
transaction, by agent.kernel.nft:

* ``inet agent_cell`` in each networked cell's netns (channel 1).  ``input`` accepts new
  connections only from the cells whose manifests name this cell as a peer, to the ports
  they name, and from the host itself (the cell's gateway address: agentd, operator
  tools; a cell can never use that source, see ``output``); ``output`` lets the cell
  open connections only to its own peers' addresses and ports, plus what
  ``network.egress`` allows.  Both chains drop everything else, and
  ``output`` drops packets whose source is not the cell's own address (anti-spoofing).
* ``inet agent_host`` in the host's netns (channel 3), for traffic routed between the
  VLAN gateways ``<bridge>.N``: each allowed pair (client -> server address:port/proto),
  cell -> outside only with egress, nothing from outside into cells or from cells to the
  host itself except replies.  Other host traffic is not touched (policy accept, and only
  packets entering or leaving a gateway interface jump into the agent's chains).

A peer whose cell does not exist has no address, so it gets no rule; the master
regenerates both kinds of table whenever cells come and go (agent.kernel.nft.FirewallSync).
Every batch starts with ``add table`` + ``delete table`` so it replaces the table
atomically whether or not it existed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, Literal

from agent.core.manifest import EgressRule, Manifest, Peer

__all__ = [
    "CELL_TABLE",
    "FAMILY",
    "HOST_TABLE",
    "CellFw",
    "Flow",
    "allowed_flows",
    "batch_json",
    "cell_ruleset",
    "delete_table",
    "host_ruleset",
]

FAMILY = "inet"
CELL_TABLE = "agent_cell"
HOST_TABLE = "agent_host"
COMMENT_MAX = 127  # nft refuses comments longer than 128 bytes (with the NUL)

Json = dict[str, Any]
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


# -- expression helpers (nft JSON schema 1) ---------------------------------------------------


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str, value: Any, op: str = "==") -> Json:
    return _match({"meta": {"key": key}}, value, op)


def _ip(field: str, value: str) -> Json:
    net = IPv4Network(value)
    right: Any = (str(net.network_address) if net.prefixlen == 32
                  else {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}})
    return _match({"payload": {"protocol": "ip", "field": field}}, right)


def _ports(proto: str, ports: Sequence[int]) -> Json:
    right: Any = ports[0] if len(ports) == 1 else {"set": list(ports)}
    return _match({"payload": {"protocol": proto, "field": "dport"}}, right)


_CT_OK = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
_CT_INVALID = _match({"ct": {"key": "state"}}, ["invalid"], "in")
_ACCEPT: Json = {"accept": None}
_DROP: Json = {"drop": None}
_COUNTER: Json = {"counter": None}


def _comment(text: str) -> str:
    raw = text.encode()
    return raw[:COMMENT_MAX].decode(errors="ignore")


class _Batch:
    def __init__(self, table: str) -> None:
        self.table = table
        t = {"family": FAMILY, "name": table}
        # add + delete: the delete cannot fail, and the whole batch is one transaction
        self.cmds: list[Json] = [{"add": {"table": dict(t)}}, {"delete": {"table": dict(t)}},
                                 {"add": {"table": dict(t)}}]

    def chain(self, name: str, hook: str | None = None, policy: str = "accept") -> None:
        c: Json = {"family": FAMILY, "table": self.table, "name": name}
        if hook is not None:
            c.update(type="filter", hook=hook, prio=0, policy=policy)
        self.cmds.append({"add": {"chain": c}})

    def rule(self, chain: str, *expr: Json, comment: str = "") -> None:
        r: Json = {"family": FAMILY, "table": self.table, "chain": chain, "expr": list(expr)}
        if comment:
            r["comment"] = _comment(comment)
        self.cmds.append({"add": {"rule": r}})

    def drop_counted(self, chain: str, comment: str) -> None:
        self.rule(chain, _COUNTER, _DROP, comment=comment)


def _egress_exprs(e: EgressRule) -> list[Json]:
    out: list[Json] = []
    if e.cidr is not None:
        out.append(_ip("daddr", e.cidr))
    if e.port is not None:
        if e.proto == "any":
            out += [_meta("l4proto", {"set": ["tcp", "udp"]}),
                    _match({"payload": {"protocol": "th", "field": "dport"}}, e.port)]
        else:
            out.append(_ports(e.proto, [e.port]))
    elif e.proto != "any":
        out.append(_meta("l4proto", e.proto))
    return out


def cell_ruleset(me: CellFw, cells: Iterable[CellFw]) -> list[Json]:
    """The batch that (re)makes ``inet agent_cell`` in ``me``'s netns.

    ``cells`` are the other cells that exist (``me`` among them or not): they give the
    addresses of ``me``'s peers and of the clients that name ``me`` as their peer.
    """
    others = {c.name: c for c in cells if c.name != me.name}
    everyone = [me, *others.values()]
    b = _Batch(CELL_TABLE)
    b.chain("input", "input", "drop")
    b.chain("output", "output", "drop")
    for chain, dev in (("input", "iifname"), ("output", "oifname")):
        b.rule(chain, _meta(dev, "lo"), _ACCEPT, comment="loopback")
        b.rule(chain, _CT_OK, _ACCEPT, comment="replies")
        b.rule(chain, _CT_INVALID, _COUNTER, _DROP, comment="invalid")
    if me.gateway:
        b.rule("input", _ip("saddr", me.gateway), _ACCEPT, comment="from the host")
    for f in allowed_flows(everyone):
        if f.server == me.name:
            b.rule("input", _ip("saddr", f.client_addr), _ports(f.proto, f.ports), _ACCEPT,
                   comment=f"peer {f.client} -> {f.server} {_portlist(f)}")
    b.drop_counted("input", "drop in")
    b.rule("output", _match({"payload": {"protocol": "ip", "field": "saddr"}}, me.address,
                            "!="), _COUNTER, _DROP, comment="spoofed source")
    for f in allowed_flows(everyone):
        if f.client == me.name:
            b.rule("output", _ip("daddr", f.server_addr), _ports(f.proto, f.ports), _ACCEPT,
                   comment=f"peer {f.client} -> {f.server} {_portlist(f)}")
    if me.egress_any:
        b.rule("output", _ACCEPT, comment="egress any")
    for e in me.egress:
        b.rule("output", *_egress_exprs(e), _ACCEPT, comment=f"egress {e}")
    b.drop_counted("output", "drop out")
    return b.cmds


def _portlist(f: Flow) -> str:
    return ",".join(map(str, f.ports)) + "/" + f.proto


def host_ruleset(cells: Iterable[CellFw], bridge: str) -> list[Json]:
    """The batch that (re)makes ``inet agent_host`` in the host netns."""
    gw = f"{bridge}.*"
    cells = sorted(cells, key=lambda c: c.name)
    b = _Batch(HOST_TABLE)
    b.chain("forward", "forward", "accept")
    b.chain("input", "input", "accept")
    for name in ("from_cell", "cell_to_cell", "into_cell", "cell_to_host"):
        b.chain(name)
    b.rule("forward", _meta("iifname", gw), {"jump": {"target": "from_cell"}},
           comment="routed from a cell")
    b.rule("forward", _meta("oifname", gw), {"jump": {"target": "into_cell"}},
           comment="routed into a cell from outside")
    b.rule("input", _meta("iifname", gw), {"jump": {"target": "cell_to_host"}},
           comment="a cell to the host itself")
    for chain in ("from_cell", "into_cell", "cell_to_host"):
        b.rule(chain, _CT_OK, _ACCEPT, comment="replies")
        b.rule(chain, _CT_INVALID, _COUNTER, _DROP, comment="invalid")
    b.rule("from_cell", _meta("oifname", gw), {"jump": {"target": "cell_to_cell"}},
           comment="between VLANs")
    for f in allowed_flows(cells):
        b.rule("cell_to_cell", _meta("iifname", f"{bridge}.{f.client_vlan}"),
               _ip("saddr", f.client_addr), _meta("oifname", f"{bridge}.{f.server_vlan}"),
               _ip("daddr", f.server_addr), _ports(f.proto, f.ports), _ACCEPT,
               comment=f"peer {f.client} -> {f.server} {_portlist(f)}")
    b.drop_counted("cell_to_cell", "drop cell to cell")
    for c in cells:
        src = [_meta("iifname", f"{bridge}.{c.vlan}"), _ip("saddr", c.address)]
        if c.egress_any:
            b.rule("from_cell", *src, _ACCEPT, comment=f"egress {c.name} any")
        for e in c.egress:
            b.rule("from_cell", *src, *_egress_exprs(e), _ACCEPT,
                   comment=f"egress {c.name} {e}")
    b.drop_counted("from_cell", "drop egress")
    b.drop_counted("into_cell", "drop into cell")
    b.drop_counted("cell_to_host", "drop cell to host")
    return b.cmds


def delete_table(table: str) -> list[Json]:
    """A batch removing ``inet <table>``; succeeds when it does not exist."""
    t = {"family": FAMILY, "name": table}
    return [{"add": {"table": dict(t)}}, {"delete": {"table": dict(t)}}]


def batch_json(cmds: Sequence[Mapping[str, Any]]) -> str:
    """What ``nft -j -f -`` reads."""
    return json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *cmds]},
                      separators=(",", ":"), sort_keys=True)
