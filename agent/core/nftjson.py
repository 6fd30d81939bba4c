"""nft JSON (schema 1) building blocks shared by the agent's rulesets (pure).

agent.core.firewall (``inet`` tables: the cells' own and the host's forwarding table)
and agent.core.l2fw (the ``bridge`` table on the cells' ports) build their batches from
these: matches, verdicts, the rate-limited NFLOG statement and :class:`Batch`, which
starts every batch with ``add table`` + ``delete table`` + ``add table`` so it replaces
the table whole, in one transaction, whether or not it existed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Network
from typing import Any

__all__ = [
    "ACCEPT",
    "COMMENT_MAX",
    "COUNTER",
    "CT_INVALID",
    "CT_OK",
    "DROP",
    "Batch",
    "Json",
    "batch_json",
    "comment_text",
    "delete_table",
    "goto",
    "ip_match",
    "jump",
    "log_limited",
    "match",
    "meta",
    "payload",
    "ports_match",
]

COMMENT_MAX = 127  # nft refuses comments longer than 128 bytes (with the NUL)
PREFIX_MAX = 127  # the same for log prefixes

Json = dict[str, Any]


def match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def meta(key: str, value: Any, op: str = "==") -> Json:
    return match({"meta": {"key": key}}, value, op)


def ip_match(field: str, value: str, op: str = "==") -> Json:
    """``ip saddr|daddr`` against one address or a CIDR."""
    net = IPv4Network(value)
    right: Any = (str(net.network_address) if net.prefixlen == 32
                  else {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}})
    return match(payload("ip", field), right, op)


def ports_match(proto: str, ports: Sequence[int]) -> Json:
    right: Any = ports[0] if len(ports) == 1 else {"set": list(ports)}
    return match(payload(proto, "dport"), right)


def jump(chain: str) -> Json:
    return {"jump": {"target": chain}}


def goto(chain: str) -> Json:
    return {"goto": {"target": chain}}


def log_limited(group: int, prefix: str, rate: int, burst: int) -> list[Json]:
    """``limit rate RATE/second burst BURST packets log group GROUP prefix PREFIX``: the
    packets past the limit skip the log (the rule has no verdict), so the kernel wakes
    the reader at most ``rate`` times a second (plus the burst) for this rule."""
    return [{"limit": {"rate": rate, "per": "second", "burst": burst}},
            {"log": {"group": group, "prefix": prefix.encode()[:PREFIX_MAX].decode(
                errors="ignore")}}]


CT_OK = match({"ct": {"key": "state"}}, ["established", "related"], "in")
CT_INVALID = match({"ct": {"key": "state"}}, ["invalid"], "in")
ACCEPT: Json = {"accept": None}
DROP: Json = {"drop": None}
COUNTER: Json = {"counter": None}


def comment_text(text: str) -> str:
    """``text`` cut to what nft accepts as a comment."""
    return text.encode()[:COMMENT_MAX].decode(errors="ignore")


class Batch:
    """The commands that (re)make one table of ``family``."""

    def __init__(self, family: str, table: str) -> None:
        self.family = family
        self.table = table
        t = {"family": family, "name": table}
        # add + delete: the delete cannot fail, and the whole batch is one transaction
        self.cmds: list[Json] = [{"add": {"table": dict(t)}}, {"delete": {"table": dict(t)}},
                                 {"add": {"table": dict(t)}}]

    def chain(self, name: str, hook: str | None = None, policy: str = "accept",
              prio: int = 0) -> None:
        c: Json = {"family": self.family, "table": self.table, "name": name}
        if hook is not None:
            c.update(type="filter", hook=hook, prio=prio, policy=policy)
        self._add({"add": {"chain": c}})

    def rule(self, chain: str, *expr: Json, comment: str = "") -> None:
        r: Json = {"family": self.family, "table": self.table, "chain": chain,
                   "expr": list(expr)}
        if comment:
            r["comment"] = comment_text(comment)
        self._add({"add": {"rule": r}})

    def _add(self, cmd: Json) -> None:
        self.cmds.append(cmd)

    def drop_counted(self, chain: str, comment: str) -> None:
        self.rule(chain, COUNTER, DROP, comment=comment)


def delete_table(table: str, family: str = "inet") -> list[Json]:
    """A batch removing ``<family> <table>``; succeeds when it does not exist."""
    t = {"family": family, "name": table}
    return [{"add": {"table": dict(t)}}, {"delete": {"table": dict(t)}}]


def batch_json(cmds: Sequence[Mapping[str, Any]]) -> str:
    """What ``nft -j -f -`` reads."""
    return json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *cmds]},
                      separators=(",", ":"), sort_keys=True)
