"""What the cell manager keeps per cell, and how it is journaled and replayed (pure).

Journal records written by agent.master (beside the executor's ``plan-*``/``op-*``)::

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

import asyncio
import collections
import dataclasses
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.admission import Amount
from agent.config import AgentConfig
from agent.errors import AgentError
from agent.journal import Journal, Record
from agent.lifecycle import Cell, Event, Exit, State
from agent.manifest import Manifest, manifest_from_dict
from agent.planner import Allocation

__all__ = ["PIN_KEYS", "CellEntry", "JournalState", "LockedJournal", "QueuedEvent",
           "alloc_from_wire", "pin_from_wire", "replay", "reserve_amount", "sigterm_caught"]

QueuedEvent = tuple[Event | Exit, str | None, int | None]  # event, error text, pid


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


@dataclass(eq=False)
class CellEntry:
    """One cell as the manager holds it (mutated on the loop only)."""

    manifest: Manifest
    cell: Cell
    alloc: Allocation
    slot: int | None = None
    pid: int | None = None
    owner: int = 0  # uid that asked for it (policy max_cells)
    plan_lines: list[str] = field(default_factory=list)
    last_error: AgentError | None = None
    queue: collections.deque[QueuedEvent] = field(default_factory=collections.deque)
    driver: asyncio.Task[None] | None = None
    waiters: list[tuple[Callable[[Cell], bool], asyncio.Future[None]]] = field(
        default_factory=list)
    restart_timer: asyncio.TimerHandle | None = None
    kill_timer: asyncio.TimerHandle | None = None
    cpu_sample: tuple[int, float] | None = None  # (usage_usec, monotonic)
    pin: dict[str, int] | None = None  # agentctl pin: the tuner's fixed size, kept over restarts

    @property
    def name(self) -> str:
        return self.cell.name

    @property
    def state(self) -> State:
        return self.cell.state

    def to_record(self) -> dict[str, Any]:
        return {"name": self.name, "cell": self.cell.to_wire(),
                "manifest": self.manifest.to_dict(), "alloc": dataclasses.asdict(self.alloc),
                "slot": self.slot, "pid": self.pid, "owner": self.owner, "pin": self.pin}

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> CellEntry:
        """Inverse of :meth:`to_record`; ValueError/KeyError/TypeError or a ManifestError
        on a malformed record."""
        m = manifest_from_dict(dict(d["manifest"]), f"journal:{d['name']}")
        pid = d.get("pid")
        slot = d.get("slot")
        return cls(m, Cell.from_wire(d["cell"]), alloc_from_wire(d["alloc"]),
                   slot if isinstance(slot, int) else None,
                   pid if isinstance(pid, int) else None, int(d.get("owner") or 0),
                   pin=pin_from_wire(d.get("pin")))

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state.value, "pid": self.pid,
                "vlan": self.alloc.vlan, "address": self.alloc.address,
                "generation": self.cell.generation}

    def resolve_waiters(self) -> None:
        keep = []
        for pred, fut in self.waiters:
            if fut.done():
                continue
            if pred(self.cell):
                fut.set_result(None)
            else:
                keep.append((pred, fut))
        self.waiters = keep


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


class LockedJournal:
    """The journal shared by the loop and the executor's worker threads."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.lock = threading.RLock()

    def append(self, t: str, data: Mapping[str, Any] | None = None, *, sync: bool) -> Record:
        with self.lock:
            return self.journal.append(t, data, sync=sync)

    def replay(self) -> Iterable[Record]:
        with self.lock:
            return list(self.journal.replay())

    def compact(self) -> None:
        with self.lock:
            self.journal.compact()


def reserve_amount(config: AgentConfig) -> Amount:
    r = config.host_reserve
    return Amount(int(r.cpu * 1000), r.memory, r.pids)


def sigterm_caught(pid: int, proc_root: str = "/proc") -> bool:
    """Does ``pid`` handle SIGTERM (SigCgt in /proc/PID/status)?  Unknown: True."""
    try:
        with open(os.path.join(proc_root, str(pid), "status")) as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except (OSError, ValueError, IndexError):
        pass
    return True
