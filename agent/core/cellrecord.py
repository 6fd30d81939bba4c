"""What the cell manager keeps per cell, and how it is journaled and replayed (pure).

Journal records written by agent.daemon.manager (beside the executor's ``plan-*``/``op-*``)::

    cell        {"name", "cell": Cell.to_wire(), "manifest": Manifest.to_dict(),
                 "alloc": {vlan, address, gateway, uid_base}, "slot", "pid", "owner",
                 "pin": {cpu, memory_high, memory_max} or None (an operator's pin)}
                every change of a cell's record (an upsert: the last one wins)
    cell-gone   {"name"}                      the cell is destroyed and forgotten
    lease       {"cell", "vlan", "address"}   an address lease was taken
    lease-free  {"cell"}                      ... and given back

:func:`replay` folds records into the last state of each; the compaction snapshot
writes exactly that state back (cells, then leases, then open plans).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.core.budget import Amount
from agent.core.config import AgentConfig
from agent.core.planner import Allocation

__all__ = [
    "PIN_KEYS",
    "JournalState",
    "alloc_from_wire",
    "pin_from_wire",
    "replay",
    "reserve_amount",
]


PIN_KEYS = ("cpu", "memory_high", "memory_max")


def pin_from_wire(v: Any) -> dict[str, int] | None:
    """A journaled pin, or None if absent or malformed (a bad pin is dropped, not fatal)."""
    if not isinstance(v, Mapping) or set(v) != set(PIN_KEYS):
        return None
    if not all(isinstance(v[k], int) and not isinstance(v[k], bool) and v[k] > 0
               for k in PIN_KEYS):
        return None
    return {k: int(v[k]) for k in PIN_KEYS}


def alloc_from_wire(d: Mapping[str, Any]) -> Allocation:
    return Allocation(d.get("vlan"), d.get("address"), d.get("gateway"), d.get("uid_base"))


@dataclass
class JournalState:
    cells: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    leases: dict[str, Mapping[str, Any]] = field(default_factory=dict)


def replay(records: Iterable[Any]) -> JournalState:
    """The last ``cell`` and ``lease`` record of every cell still there (pure; odd
    records are ignored)."""
    st = JournalState()
    for rec in records:
        d = rec.data
        name = d.get("name") if rec.t in ("cell", "cell-gone") else d.get("cell")
        if not isinstance(name, str):
            continue
        if rec.t == "cell":
            st.cells[name] = d
        elif rec.t == "cell-gone":
            st.cells.pop(name, None)
        elif rec.t == "lease":
            st.leases[name] = d
        elif rec.t == "lease-free":
            st.leases.pop(name, None)
    return st


def reserve_amount(config: AgentConfig) -> Amount:
    r = config.host_reserve
    return Amount(int(r.cpu * 1000), r.memory, r.pids)


