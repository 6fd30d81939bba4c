"""The one record of each cell's runtime state, and the narrow views services read it by.

:class:`CellEntry` is created by the cell manager when a cell is admitted or adopted and
dropped when the cell is forgotten.  Each of its parts has one writer:

* the lifecycle record (manifest, :class:`~agent.core.lifecycle.Cell`, allocation, slot,
  pid, owner, pin, plan lines, last error) and :class:`Drive` (the event queue, the
  driver task, waiters, timers): the cell manager;
* :attr:`CellEntry.tuned` (:class:`Tuned`, None while the cell is not tuned): the tuner;
* :attr:`CellEntry.rung` (:class:`Rung`: escalation level and cpu.weight): the reclaim
  loop, and the tuner holds off while the level is not "none";
* :attr:`CellEntry.cpu_sample`: whoever reads the cell's CPU usage for ``ps``/``top``.

Services never import each other (docs/architecture.md): the tuner and the reclaim loop
see the manager as a :class:`CellsHost`, the reclaim loop sees the tuner as a
:class:`TunerView`, the op handlers see the manager as a :class:`CellDirectory`.
Everything here is mutated on the loop thread only.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.core.budget import Amount, Ledger
from agent.core.cell import Cell, Exit, State
from agent.core.cellrecord import alloc_from_wire, pin_from_wire
from agent.core.cgroup import CellStats
from agent.core.errors import AgentError
from agent.core.firewall import CellFw
from agent.core.lifecycle import Event
from agent.core.manifest import Manifest, manifest_from_dict
from agent.core.planner import Allocation, cell_firewall
from agent.core.policy import Policy
from agent.core.reclaim import Level
from agent.core.tunerstate import Bounds, Sample, TunerState
from agent.daemon.bus import EventBus
from agent.kernel.knobs import Knobs, PriWatch, SampleReader

__all__ = ["CellDirectory", "CellEntry", "CellsHost", "Drive", "ExitCallback", "Journal",
           "QueuedEvent", "Rung", "Tuned", "TunerView"]

QueuedEvent = tuple[Event | Exit, str | None, int | None]  # event, error text, pid
ExitCallback = Callable[[str, int, Exit], None]  # cell, host pid of pid 1, how it ended


@dataclass(eq=False)
class Drive:
    """The manager's driver of one cell: events are handled one at a time, in order."""

    queue: collections.deque[QueuedEvent] = field(default_factory=collections.deque)
    task: asyncio.Task[None] | None = None
    waiters: list[tuple[Callable[[Cell], bool], asyncio.Future[None]]] = field(
        default_factory=list)
    restart_timer: asyncio.TimerHandle | None = None
    kill_timer: asyncio.TimerHandle | None = None

    def resolve_waiters(self, cell: Cell) -> None:
        keep = []
        for pred, fut in self.waiters:
            if fut.done():
                continue
            if pred(cell):
                fut.set_result(None)
            else:
                keep.append((pred, fut))
        self.waiters = keep


@dataclass(eq=False)
class Tuned:
    """The tuner's part of a cell under tuning."""

    cell: str
    bounds: Bounds
    state: TunerState
    priority: int
    cpu_min: int
    sources: list[str]              # "psi:cpu", "psi:memory", "memory.events", "v1:pressure"
    events_watch: PriWatch | None = None
    v1_fd: int | None = None
    prev_sample: Sample | None = None
    reader: SampleReader | None = None
    interval: float = 5.0           # the wait before the next sample
    due: float | None = None        # when it is next sampled; None: quiet

    @property
    def triggered(self) -> bool:
        """Both resources wake the tuner by themselves (else: sampled always)."""
        return "psi:cpu" in self.sources and (
            "psi:memory" in self.sources or "v1:pressure" in self.sources)


@dataclass
class Rung:
    """The reclaim loop's part: where the cell is on the escalation ladder."""

    level: Level = "none"
    since: float = 0.0
    last_reclaim_at: float = -math.inf
    weight: int | None = None  # cpu.weight as last written (None: not read yet)


@dataclass(eq=False)
class CellEntry:
    """One cell: its lifecycle record and the runtime parts of each service."""

    manifest: Manifest
    cell: Cell
    alloc: Allocation
    slot: int | None = None
    pid: int | None = None
    owner: int = 0  # uid that asked for it (policy max_cells)
    pin: dict[str, int] | None = None  # agentctl pin: the tuner's fixed size, kept over restarts
    plan_lines: list[str] = field(default_factory=list)
    last_error: AgentError | None = None
    drive: Drive = field(default_factory=Drive)
    tuned: Tuned | None = None
    rung: Rung = field(default_factory=Rung)
    cpu_sample: tuple[int, float] | None = None  # (usage_usec, monotonic)
    alerts: int = 0  # alert events about it since agentd started (agentctl ps)
    # what the firewall knows of it, made once per (manifest, allocation) object pair: the
    # firewall's refreshes ask for every cell's at each start and stop (issue 14)
    _fw: tuple[Manifest, Allocation, CellFw | None] | None = field(default=None, repr=False)

    def firewall_view(self) -> CellFw | None:
        cached = self._fw
        if cached is not None and cached[0] is self.manifest and cached[1] is self.alloc:
            return cached[2]
        view = cell_firewall(self.manifest, self.alloc)
        self._fw = (self.manifest, self.alloc, view)
        return view

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


# ---------------------------------------------------------------------- narrow views

class Journal(Protocol):
    def append(self, t: str, data: Mapping[str, Any] | None = None, *, sync: bool) -> Any: ...


class CellsHost(Protocol):
    """What the tuner and the reclaim loop need of the cell manager."""

    @property
    def bus(self) -> EventBus: ...
    @property
    def cells(self) -> Mapping[str, CellEntry]: ...
    @property
    def journal(self) -> Journal | None: ...
    @property
    def ledger(self) -> Ledger: ...
    def keep_pin(self, cell: str, pin: Mapping[str, int] | None) -> None: ...
    def post(self, e: CellEntry, ev: Event) -> None: ...
    def cell_lock(self, cell: str) -> asyncio.Lock:
        """Held while a cell of that name is started or stopped."""
        ...


class StatsSource(Protocol):
    def stats(self, cell: str) -> CellStats: ...


class CellDirectory(CellsHost, Protocol):
    """What another service's op handlers need of the cell manager (``top``, ``pin``)."""

    @property
    def policy(self) -> Policy: ...
    @property
    def cgroup(self) -> StatsSource: ...
    def entry(self, name: str) -> CellEntry: ...


class TunerView(Protocol):
    """What the reclaim loop needs of the tuner."""

    @property
    def knobs(self) -> Knobs: ...
    @property
    def cells(self) -> Mapping[str, Tuned]: ...
    def reconcile(self, cell: str | None = None) -> None: ...
    def set_held(self, cell: str, held: Amount) -> None: ...
