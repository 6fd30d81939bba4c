"""Which patterns an event concerns: the engine's index, built per (channel, kind).

A *role* is one thing a pattern does with events of a (channel, kind): an until clause
that may cancel, a later step that may advance partial matches, the first step that
may begin one.  For each (channel, kind) seen, :func:`build` lists the roles in the
order the engine runs them: every until clause, then every later step (those of one
pattern from the last one down: an event advances a partial match by one step at most),
then every first step.  Patterns do not interact, so only the order within a pattern
matters; the engine orders the matches by pattern.

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

__all__ = ["Plan", "Roles", "build", "merge"]

Until = tuple[Runner, int]  # (runner, until clause)
# (order, the step's partials by probe value, runner, step): a runner's steps run from the
# last one down (an event advances a partial by one step at most); the index dict is
# read directly: most steps await nothing most of the time
Advance = tuple[int, dict[Any, Any], Runner, int]
Roles = tuple[tuple[Until, ...], tuple[Advance, ...], tuple[Runner, ...]]
Plan = tuple[Roles, tuple[tuple[Getter, dict[Any, Roles]], ...]]
_PER_RUNNER = 100  # > the most steps of a pattern


def _selects(sel: Selector, channel: str, kind: str) -> bool:
    return sel.channel == channel and (kind in sel.kinds or sel.kinds == ("*",))


def merge(a: Roles, b: Roles) -> Roles:
    """Two sets of roles as one.  No pattern has two steps in both (:func:`build` gates
    a pattern's step only when it is the pattern's one step awaiting the kind)."""
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def _roles(items: list[tuple[int, int, Any]]) -> Roles:
    """Roles from (what, order, role) items: 0 until, 1 advance, 2 start."""
    items.sort(key=lambda t: (t[0], t[1]))
    return (tuple(r for w, _, r in items if w == 0), tuple(r for w, _, r in items if w == 1),
            tuple(r for w, _, r in items if w == 2))


def build(runners: Sequence[Runner], channel: str, kind: str) -> Plan:
    """The roles of ``runners`` for events of ``channel``/``kind`` (see the module doc)."""
    always: list[tuple[int, int, Any]] = []
    gated: dict[str, list[tuple[tuple[int, int, Any], frozenset[Any]]]] = defaultdict(list)
    for ri, r in enumerate(runners):
        cp = r.cp
        n = len(cp.steps)
        mine: list[tuple[tuple[int, int, Any], Any]] = []
        for i, (sel, u) in enumerate(zip(cp.until_on, cp.until, strict=True)):
            if _selects(sel, channel, kind):
                mine.append(((0, ri, (r, i)), u.gate))
        steps = [k for k in range(n - 1, 0, -1) if _selects(cp.step_on[k], channel, kind)]
        for k in steps:
            # several steps of one pattern await this kind: keep them together, in order
            gate = cp.steps[k].gate if len(steps) == 1 else None
            order = ri * _PER_RUNNER + n - k
            mine.append(((1, order, (order, r.buckets[k], r, k)), gate))
        if _selects(cp.step_on[0], channel, kind):
            mine.append(((2, ri, r), cp.steps[0].gate))
        for item, gate in mine:
            if gate is None:
                always.append(item)
            else:
                gated[gate[0]].append((item, gate[1]))
    gates = []
    for attr, items in gated.items():
        if len(items) < 2:  # a gate for one role costs more than trying the role
            always += [item for item, _ in items]
            continue
        table: dict[Any, list[tuple[int, int, Any]]] = defaultdict(list)
        for item, keys in items:
            for key in keys:
                table[key].append(item)
        gates.append((getter(attr), {k: _roles(v) for k, v in table.items()}))
    return _roles(always), tuple(gates)
