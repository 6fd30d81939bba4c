"""Which cells channel 3 watches: the cell manager's records as :class:`CellNet` rows
(:class:`ManagerCells`), and the address and uid directory the rules read over one
snapshot of them (:class:`Directory`).  Duck-typed: a monitor does not import the
daemon."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any, Protocol

from agent.core.cell import State
from agent.core.lifecycle import HOLDS_TABLE, IN_FIREWALL
from agent.core.planner import Allocation

__all__ = ["CellNet", "Cells", "Directory", "ManagerCells"]

MAKING = frozenset({State.CREATING})  # its netns may hold its table (plan under way)


@dataclass(frozen=True)
class CellNet:
    """A networked cell as channel 3 needs it."""

    name: str
    address: str
    gateway: str | None
    uid_base: int | None
    netns: Path | None  # its pinned netns (None: not made yet, or gone)
    table: bool = False  # the netns holds the cell's table (and its log rules)


class Cells(Protocol):
    def net_cells(self) -> list[CellNet]: ...


class _Entry(Protocol):
    @property
    def state(self) -> Any: ...
    @property
    def alloc(self) -> Allocation: ...


class _Manager(Protocol):
    @property
    def cells(self) -> Mapping[str, _Entry]: ...


@functools.lru_cache(maxsize=1024)
def _ip_of(address: str) -> str:
    """``10.77.0.2/24`` -> ``10.77.0.2`` (asked for every cell at each lifecycle change:
    parsed once per address)."""
    return str(IPv4Interface(address).ip)


class ManagerCells:
    """:class:`Cells` over the cell manager's records (duck-typed: a monitor does not
    import the daemon).  ``netns_path``: the cell -> pinned netns function of HostNet."""

    def __init__(self, mgr: _Manager, netns_path: Callable[[str], Path]) -> None:
        self.mgr = mgr
        self.netns_path = netns_path

    def net_cells(self) -> list[CellNet]:
        out = []
        for name, e in list(self.mgr.cells.items()):
            a = e.alloc
            if a.address is None or e.state not in IN_FIREWALL:
                continue
            table = e.state in HOLDS_TABLE
            out.append(CellNet(name, _ip_of(a.address), a.gateway, a.uid_base,
                               self.netns_path(name) if table or e.state in MAKING else None,
                               table))
        return out


class Directory:
    """agent.monitor.net.rules.Directory over one snapshot of the cells (and the uid
    bases of cells gone whose log sockets are still read: ``retired``)."""

    def __init__(self, cells: list[CellNet],
                 retired: Mapping[str, int | None] | None = None) -> None:
        self.by_addr = {c.address: c.name for c in cells}
        self.hosts = {c.gateway for c in cells if c.gateway}
        self.uids = {**(retired or {}), **{c.name: c.uid_base for c in cells}}

    def cell_of(self, address: str) -> str | None:
        return self.by_addr.get(address)

    def is_host(self, address: str) -> bool:
        return address in self.hosts

    def uid_base(self, cell: str) -> int | None:
        return self.uids.get(cell)
