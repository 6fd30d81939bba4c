"""Which patterns an event concerns: the engine's index, built per (channel, kind).

A *role* is one thing a pattern does with events of a (channel, kind): an until clause
that may cancel, a later step that may advance partial matches, the first step that
may begin one.  For each (channel, kind) seen, :func:`build` lists the roles in the
order the engine must run them: pattern by pattern, and within a pattern until
clauses, then later steps from the last one down (an event advances a partial match by
one step at most), then the first step.

A role whose conditions allow only some values of an attribute (``syscall == mount``,
``op in {...}``) is put behind a *gate*: a table from the attribute's value to the
roles, so that an event looks up the few roles its value concerns instead of trying all
of them.  Gates are only made for attributes that two roles or more test.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from agent.monitor.correlation.compiled import Getter, getter
from agent.monitor.correlation.model import Selector
from agent.monitor.correlation.runner import Runner

__all__ = ["ADVANCE", "START", "UNTIL", "Plan", "Role", "build"]

UNTIL, ADVANCE, START = 0, 1, 2
# (order, runner, what, index): order sorts the roles of several gates back together
Role = tuple[int, Runner, int, int]
Plan = tuple[tuple[Role, ...], tuple[tuple[Getter, dict[Any, tuple[Role, ...]]], ...]]
_PER_RUNNER = 1000  # > 2 * the most steps and until clauses of a pattern


def _selects(sel: Selector, channel: str, kind: str) -> bool:
    return sel.channel == channel and (kind in sel.kinds or sel.kinds == ("*",))


def build(runners: Sequence[Runner], channel: str, kind: str) -> Plan:
    """The roles of ``runners`` for events of ``channel``/``kind`` (see the module doc)."""
    always: list[Role] = []
    gated: dict[str, list[tuple[Role, frozenset[Any]]]] = defaultdict(list)
    for ri, r in enumerate(runners):
        cp = r.cp
        base = ri * _PER_RUNNER
        n = len(cp.steps)
        mine: list[tuple[Role, Any]] = []
        for i, (sel, u) in enumerate(zip(cp.until_on, cp.until, strict=True)):
            if _selects(sel, channel, kind):
                mine.append(((base + i, r, UNTIL, i), u.gate))
        for k in range(n - 1, 0, -1):
            if _selects(cp.step_on[k], channel, kind):
                mine.append(((base + 100 + n - k, r, ADVANCE, k), cp.steps[k].gate))
        if _selects(cp.step_on[0], channel, kind):
            mine.append(((base + 999, r, START, 0), cp.steps[0].gate))
        for role, gate in mine:
            if gate is None:
                always.append(role)
            else:
                gated[gate[0]].append((role, gate[1]))
    gates = []
    for attr, roles in gated.items():
        if len(roles) < 2:  # a gate for one role costs more than trying the role
            always += [role for role, _ in roles]
            continue
        table: dict[Any, list[Role]] = defaultdict(list)
        for role, keys in roles:
            for key in keys:
                table[key].append(role)
        gates.append((getter(attr), {k: tuple(v) for k, v in table.items()}))
    always.sort(key=lambda role: role[0])
    return tuple(always), tuple(gates)
