"""A small evaluator of the nft JSON the agent generates, so tests check what the rules
*do* to a packet, not how they are written.

It knows the subset agent.core.firewall and agent.core.l2fw use: matches on ``meta``,
``payload`` and ``ct state`` (``==``, ``!=``, ``in``; scalars, sets, prefixes, ``*``
wildcards of interface names), the statements counter/limit/log (which do not decide;
logs are recorded) and the verdicts accept, drop, jump, goto, return and verdict maps.
A payload match on a header the packet does not have does not match, whatever its
operator (nft's protocol dependency): ``ip saddr != X`` never matches an IPv6 packet.
Anything else raises, so a new kind of expression cannot be silently misread.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from typing import Any

Pkt = Mapping[str, Any]  # "meta.iifname", "ip.saddr", "ether.type", "ct.state", ...


@dataclass
class Result:
    verdict: str  # accept or drop
    logs: list[str] = field(default_factory=list)  # log prefixes, in order
    by: str = ""  # comment of the deciding rule ("policy" for a base chain's policy)


class Ruleset:
    def __init__(self, batch: Sequence[Mapping[str, Any]]) -> None:
        self.chains: dict[str, dict[str, Any]] = {}
        self.rules: dict[str, list[dict[str, Any]]] = {}
        for cmd in batch:
            add = cmd.get("add", {})
            if "chain" in add:
                c = add["chain"]
                self.chains[c["name"]] = c
                self.rules.setdefault(c["name"], [])
            elif "rule" in add:
                r = add["rule"]
                assert r["chain"] in self.chains, f"rule before its chain {r['chain']}"
                self.rules[r["chain"]].append(r)

    def run(self, chain: str, pkt: Pkt) -> Result:
        res = Result("")
        v = self._chain(chain, pkt, res, 0)
        if v in ("", "return"):
            res.verdict, res.by = self.chains[chain].get("policy", "accept"), "policy"
        else:
            res.verdict = v
        return res

    def _chain(self, name: str, pkt: Pkt, res: Result, depth: int) -> str:
        assert depth < 16, "jump loop"
        for r in self.rules[name]:
            v = self._rule(r, pkt, res, depth)
            if v == "return":
                return ""
            if v:
                if not res.by:
                    res.by = r.get("comment", "")
                return v
        return ""

    def _rule(self, r: Mapping[str, Any], pkt: Pkt, res: Result, depth: int) -> str:
        for e in r["expr"]:
            (kind, arg), = e.items()
            if kind == "match":
                if not _match(arg, pkt):
                    return ""
            elif kind in ("counter", "limit"):
                continue
            elif kind == "log":
                res.logs.append(arg["prefix"])
            elif kind in ("accept", "drop"):
                return kind
            elif kind == "return":
                return "return"
            elif kind in ("jump", "goto"):
                v = self._chain(arg["target"], pkt, res, depth + 1)
                if v or kind == "goto":
                    return v or "return"
            elif kind == "vmap":
                key = _value(arg["key"], pkt)
                if key is _ABSENT:
                    return ""
                for k, verdict in arg["data"]["set"]:
                    if _eq(key, k):
                        return self._rule({"expr": [verdict]}, pkt, res, depth)
            else:
                raise AssertionError(f"unknown expression {kind}")
        return ""


_ABSENT = object()


def _left_key(left: Mapping[str, Any]) -> str:
    if "meta" in left:
        return "meta." + left["meta"]["key"]
    if "payload" in left:
        return f"{left['payload']['protocol']}.{left['payload']['field']}"
    if "ct" in left:
        return "ct." + left["ct"]["key"]
    raise AssertionError(f"unknown left side {left}")


def _value(left: Mapping[str, Any], pkt: Pkt) -> Any:
    key = _left_key(left)
    if key.startswith("meta."):
        assert key in pkt, f"packet lacks {key}"
    return pkt.get(key, _ABSENT)


def _eq(have: Any, want: Any) -> bool:
    if isinstance(want, dict) and "prefix" in want:
        net = ip_network(f"{want['prefix']['addr']}/{want['prefix']['len']}")
        return ip_address(have) in net
    if isinstance(want, str) and isinstance(have, str):
        if "*" in want:
            return fnmatch.fnmatchcase(have, want)
        try:
            return ip_address(have) == ip_address(want)
        except ValueError:
            return have == want
    return bool(have == want)


def _match(m: Mapping[str, Any], pkt: Pkt) -> bool:
    have = _value(m["left"], pkt)
    if have is _ABSENT:
        return False  # the protocol dependency fails: no match, whatever the operator
    right, op = m["right"], m["op"]
    if op == "in":  # ct state in [...]
        return bool(set(have) & set(right)) if isinstance(have, list | set) else have in right
    items = right["set"] if isinstance(right, dict) and "set" in right else [right]
    hit = any(_eq(have, w) for w in items)
    if op == "==":
        return hit
    if op == "!=":
        return not hit
    raise AssertionError(f"unknown operator {op}")
