"""TODO docstring."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.core.cellrecord import alloc_from_wire, pin_from_wire
from agent.core.errors import AgentError
from agent.core.lifecycle import Cell, Event, Exit, State
from agent.core.manifest import Manifest, manifest_from_dict
from agent.core.planner import Allocation

__all__ = ["CellEntry", "QueuedEvent"]

QueuedEvent = tuple[Event | Exit, str | None, int | None]  # event, error text, pid


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
