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
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError

Pkt = Mapping[str, Any]  # "meta.iifname", "ip.saddr", "ether.type", "ct.state", ...


@dataclass
class Result:
    verdict: str  # accept or drop
    logs: list[str] = field(default_factory=list)  # log prefixes, in order
    by: str = ""  # comment of the deciding rule ("policy" for a base chain's policy)


class Ruleset:
    """One table's state, made by a batch and changed by later ones (:meth:`apply`)."""

    def __init__(self, batch: Sequence[Mapping[str, Any]] = ()) -> None:
        self.chains: dict[str, dict[str, Any]] = {}
        self.rules: dict[str, list[dict[str, Any]]] = {}
        self.maps: dict[str, dict[str, Any]] = {}  # name -> its "add map" object
        self.elements: dict[str, dict[Any, Any]] = {}  # map -> key -> verdict
        self.apply(batch)

    def apply(self, batch: Sequence[Mapping[str, Any]]) -> None:
        """What the kernel does with the commands the agent sends (add/delete of a table,
        chain, rule, map, element; flush of a chain), checking what it would refuse."""
        for cmd in batch:
            (op, body), = cmd.items()
            (what, obj), = body.items()
            getattr(self, f"_{op}_{what}")(obj)

    def _add_table(self, obj: Mapping[str, Any]) -> None:
        pass

    def _delete_table(self, obj: Mapping[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def _add_chain(self, c: Mapping[str, Any]) -> None:
        assert c["name"] not in self.chains, f"chain {c['name']} exists"
        self.chains[c["name"]] = dict(c)
        self.rules[c["name"]] = []

    def _add_rule(self, r: Mapping[str, Any]) -> None:
        assert r["chain"] in self.chains, f"rule before its chain {r['chain']}"
        for e in r["expr"]:
            (kind, arg), = e.items()
            if kind in ("jump", "goto"):
                assert arg["target"] in self.chains, f"{kind} to no chain {arg['target']}"
            if kind == "vmap" and isinstance(arg["data"], str):
                assert arg["data"][1:] in self.maps, f"no map {arg['data']}"
        self.rules[r["chain"]].append(dict(r))

    def _add_map(self, m: Mapping[str, Any]) -> None:
        assert m["name"] not in self.maps, f"map {m['name']} exists"
        self.maps[m["name"]] = dict(m)
        self.elements[m["name"]] = {}

    def _add_element(self, e: Mapping[str, Any]) -> None:
        assert e["name"] in self.maps, f"element of no map {e['name']}"
        for key, verdict in e["elem"]:
            (_, arg), = verdict.items()
            assert arg["target"] in self.chains, f"element jumps to no chain {arg['target']}"
            k = _key(key)
            assert k not in self.elements[e["name"]], f"element {key} exists"
            self.elements[e["name"]][k] = verdict

    def _delete_element(self, e: Mapping[str, Any]) -> None:
        for key in e["elem"]:
            assert _key(key) in self.elements[e["name"]], f"no element {key}"
            del self.elements[e["name"]][_key(key)]

    def _flush_chain(self, c: Mapping[str, Any]) -> None:
        self.rules[c["name"]] = []

    def _delete_chain(self, c: Mapping[str, Any]) -> None:
        name = c["name"]
        assert not self.rules[name], f"chain {name} is not empty"
        used = [r for rs in self.rules.values() for r in rs for e in r["expr"]
                if e.get("jump", e.get("goto", {})).get("target") == name]
        used += [v for els in self.elements.values() for v in els.values()
                 if v.get("jump", {}).get("target") == name]
        assert not used, f"chain {name} is still used"
        del self.chains[name], self.rules[name]

    def state(self) -> tuple[Any, ...]:
        """What the table holds, comparable between two ways of making it."""
        return ({n: sorted(c.items()) for n, c in self.chains.items()},
                {n: [(r["expr"], r.get("comment", "")) for r in rs]
                 for n, rs in self.rules.items()},
                {n: sorted(m.items(), key=str) for n, m in self.maps.items()},
                {n: sorted(els.items(), key=str) for n, els in self.elements.items()})

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
                data = arg["data"]
                pairs = (self.elements[data[1:]].items() if isinstance(data, str)
                         else ((_key(k), v) for k, v in data["set"]))
                for k, verdict in pairs:
                    if _eq(key, k):
                        return self._rule({"expr": [verdict]}, pkt, res, depth)
                return ""
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


def _key(key: Any) -> Any:
    """A map element's key, hashable: a concatenation is a tuple."""
    return tuple(key["concat"]) if isinstance(key, dict) and "concat" in key else key


def _value(left: Mapping[str, Any], pkt: Pkt) -> Any:
    if "concat" in left:
        parts = tuple(_value(p, pkt) for p in left["concat"])
        return _ABSENT if _ABSENT in parts else parts
    key = _left_key(left)
    if key.startswith("meta."):
        assert key in pkt, f"packet lacks {key}"
    return pkt.get(key, _ABSENT)


def _eq(have: Any, want: Any) -> bool:
    if isinstance(have, tuple):
        return isinstance(want, tuple) and len(have) == len(want) and \
            all(_eq(h, w) for h, w in zip(have, want, strict=True))
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


# -- an nft that records what it was given and keeps each table as the kernel would ------


def _table_of(cmd: dict[str, Any]) -> str:
    (obj,) = next(iter(cmd.values())).items()
    what, body = obj
    return str(body["name"] if what == "table" else body["table"])


@dataclass
class FakeNft:
    applied: list[tuple[str | None, str]] = field(default_factory=list)
    fail_netns: set[str] = field(default_factory=set)
    fail_tables: set[str] = field(default_factory=set)
    runs: int = 0  # nft invocations

    # what each table holds, as the kernel would have it (nfteval checks each command)
    tables: dict[tuple[str | None, str], Ruleset] = field(default_factory=dict)

    def apply(self, batch: Sequence[dict[str, Any]], netns: Path | None = None) -> None:
        self.runs += 1
        ns = None if netns is None else netns.name
        if ns in self.fail_netns:
            raise AgentError("E_NFT", f"nft apply batch in {netns}: boom")
        names = [_table_of(c) for c in batch]
        if set(names) & self.fail_tables:
            raise AgentError("E_NFT", "nft apply batch: Could not process rule")
        deleting = len(batch) == 2 * len(set(names)) and all(  # add+delete of each table
            "table" in next(iter(c.values())) for c in batch)
        for table in dict.fromkeys(names):  # a table's commands: once
            self.applied.append((ns, f"-{table}" if deleting else table))
        for c, table in zip(batch, names, strict=True):
            self.tables.setdefault((ns, table), Ruleset()).apply([c])

    def delete_table(self, table: str, netns: Path | None = None) -> None:
        self.applied.append((None if netns is None else netns.name, f"-{table}"))
