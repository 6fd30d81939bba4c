"""The host's reclaim loop as a service: agent/reclaim.py's passes on a timer.

Every ``period_s`` (10 s) it builds a :class:`~agent.reclaim.CellView` per tuned cell
(from the tuner's state) and a :class:`~agent.reclaim.BoxView` (``/proc/pressure/memory``,
the journaled cells, and every ``scan_s`` the agent-owned kernel objects found by
:class:`KernelObjects`), runs :func:`~agent.reclaim.reclaim_pass` and carries out its
actions in order, each a ``reclaim`` event and (except weights) a journal record; a pass
that did anything ends with a ``reclaim``/``pass`` summary event.  Blocking work (the
netlink scan, orphan teardown, freeze) runs in a worker thread; the loop never polls
between passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.admission import Request, read_host_pressure
from agent.cgroup import CgroupBackend
from agent.errors import AgentError
from agent.events import Severity
from agent.lifecycle import Event
from agent.orphans import KernelObjects
from agent.reclaim import (
    Action,
    BoxView,
    CellView,
    CollectOrphan,
    Freeze,
    KernelObject,
    Level,
    MemoryReclaim,
    ReclaimConfig,
    ReturnBudget,
    SetCpuWeight,
    Stop,
    Thaw,
    Throttle,
    Unthrottle,
    reclaim_pass,
    summarize,
)
from agent.tuner import commitment, settled
from agent.tunerd import Host, Tuner

__all__ = ["KernelObjects", "ManagerHost", "Reclaimer", "box_memory_avg10"]

log = logging.getLogger(__name__)
DEFAULT_CONFIG = ReclaimConfig()


class ManagerHost(Host, Protocol):
    def post(self, e: Any, ev: Event) -> None: ...


def box_memory_avg10(proc_root: str = "/proc") -> float | None:
    """``/proc/pressure/memory`` some avg10, or None without PSI."""
    try:
        p = read_host_pressure(proc_root).memory
    except AgentError:
        return None
    return p.some.avg10 if p is not None else None


def _has_memory_reclaim(backend: CgroupBackend) -> bool:
    try:  # agent.cgroupdetect needs cgroupspy (the v1 backend)
        from agent.cgroupdetect import features
    except ImportError:
        return (Path(backend.root) / "memory.reclaim").exists()
    return "memory.reclaim" in features(backend)


@dataclass
class _Rung:
    level: Level = "none"
    since: float = 0.0
    last_reclaim_at: float = -math.inf


@dataclass
class Reclaimer:
    """The loop.  ``objects`` None: no orphan scan (tests, or no bridge)."""

    host: ManagerHost
    tuner: Tuner
    backend: CgroupBackend
    loop: asyncio.AbstractEventLoop
    objects: KernelObjects | None = None
    config: ReclaimConfig = DEFAULT_CONFIG
    period_s: float = 10.0
    scan_s: float = 30.0
    box_pressure: Callable[[], float | None] = box_memory_avg10
    clock: Callable[[], float] = time.monotonic
    rungs: dict[str, _Rung] = field(default_factory=dict)
    seen: dict[tuple[str, str], float] = field(default_factory=dict)
    passes: int = 0
    _timer: asyncio.TimerHandle | None = None
    _task: asyncio.Task[None] | None = None
    _last_scan: float = -math.inf
    _closed: bool = False
    _has_reclaim: bool | None = None

    def start(self) -> None:
        self._timer = self.loop.call_later(self.period_s, self._due)

    def _due(self) -> None:
        self._timer = None
        self._task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.run_pass()
        except Exception as exc:  # a failing pass is an event; the loop keeps going
            log.exception("reclaim pass failed")
            self.host.bus.emit("reclaim", "error", severity="notice", error=str(exc))
        if not self._closed:
            self._timer = self.loop.call_later(self.period_s, self._due)

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ------------------------------------------------------------------ views
    def views(self, now: float) -> list[CellView]:
        out = []
        for cell, t in sorted(self.tuner.cells.items()):
            s, smp = t.state, t.state.last_sample
            rung = self.rungs.setdefault(cell, _Rung())
            weight = self.tuner.knobs.cpu_weight(cell) or 100
            out.append(CellView(
                cell, t.priority, t.cpu_min, t.bounds.cpu_lo, t.bounds.memory_lo, s.held,
                commitment(s.size, s.held.pids), settled(s, now), s.memory_idle >= 2,
                smp.memory_current if smp else 0, s.size.cpu, s.size.memory_high, weight,
                rung.level, rung.since, rung.last_reclaim_at))
        for gone in set(self.rungs) - set(self.tuner.cells):
            del self.rungs[gone]
        return out

    async def _scan(self, now: float) -> tuple[KernelObject, ...]:
        if self.objects is None or now - self._last_scan < self.scan_s:
            return ()
        self._last_scan = now
        owners = {e.alloc.vlan: name for name, e in self.host.cells.items()
                  if getattr(e, "alloc", None) is not None and e.alloc.vlan is not None}
        found = await asyncio.to_thread(self.objects.scan, owners)
        keys = {(k, n) for k, n, _ in found}
        self.seen = {k: v for k, v in self.seen.items() if k in keys}
        out = []
        for kind, name, cell in found:
            since = self.seen.setdefault((kind, name), now)
            out.append(KernelObject(kind, name, cell, since))  # type: ignore[arg-type]
        return tuple(out)

    # ------------------------------------------------------------------ one pass
    async def run_pass(self) -> list[Action]:
        now = self.clock()
        self.passes += 1
        self.tuner.reconcile()  # a safety net for a missed lifecycle event
        objects = await self._scan(now)
        if self._has_reclaim is None:
            self._has_reclaim = _has_memory_reclaim(self.backend)
        box = BoxView(self.box_pressure(), self._has_reclaim, frozenset(self.host.cells), objects)
        actions = reclaim_pass(self.views(now), box, now, self.config)
        done: list[Action] = []
        for a in actions:
            try:
                await self._carry_out(a, now)
            except (AgentError, OSError) as exc:
                log.error("reclaim %s for %s failed: %s", type(a).__name__, a.cell, exc)
                self.host.bus.emit("reclaim", "error", cell=a.cell, severity="notice",
                                   action=type(a).__name__, error=str(exc))
                continue
            done.append(a)
            attrs = a.attrs()
            loud = isinstance(a, Throttle | Freeze | Stop | CollectOrphan)
            sev: Severity = "notice" if loud else "info"
            self.host.bus.emit("reclaim", a.kind, cell=a.cell, severity=sev, **attrs)
            if not isinstance(a, SetCpuWeight) and self.host.journal is not None:
                with contextlib.suppress(AgentError, OSError):
                    self.host.journal.append("reclaim", {"cell": a.cell, "kind": a.kind,
                                                         **attrs}, sync=False)
        if done:
            summary: dict[str, Any] = summarize(done).attrs()
            self.host.bus.emit("reclaim", "pass", severity="info", **summary)
        return done

    def _level(self, cell: str, level: Level, now: float) -> None:
        self.rungs[cell] = _Rung(level, now, self.rungs.get(cell, _Rung()).last_reclaim_at)
        t = self.tuner.cells.get(cell)
        if t is not None:
            t.level = level

    async def _carry_out(self, a: Action, now: float) -> None:
        k, cell = self.tuner.knobs, a.cell or ""
        if isinstance(a, CollectOrphan):
            assert self.objects is not None
            await asyncio.to_thread(self.objects.collect, a)
            self.seen.pop((a.object_kind, a.name), None)
        elif isinstance(a, ReturnBudget):
            self.host.budget = self.host.budget.replace(Request(cell, a.new))
            self.tuner.set_held(cell, a.new)
        elif isinstance(a, MemoryReclaim):
            self.rungs.setdefault(cell, _Rung()).last_reclaim_at = now
            await asyncio.to_thread(k.reclaim, cell, a.bytes)
        elif isinstance(a, SetCpuWeight):
            k.set_cpu_weight(cell, a.new)
        elif isinstance(a, Throttle):
            k.set_cpu_max(cell, a.cpu_new)
            k.set_memory_high(cell, a.high_new)
            self._level(cell, "throttled", now)
        elif isinstance(a, Freeze):
            await asyncio.to_thread(self.backend.freeze, cell)
            self._level(cell, "frozen", now)
        elif isinstance(a, Thaw):
            await asyncio.to_thread(self.backend.thaw, cell)
            self._level(cell, "throttled", now)
        elif isinstance(a, Unthrottle):
            k.set_cpu_max(cell, a.cpu)
            k.set_memory_high(cell, a.memory_high)
            self._level(cell, "none", now)
        elif isinstance(a, Stop):
            self._level(cell, "stopped", now)
            e = self.host.cells.get(cell)
            if e is not None:
                with contextlib.suppress(AgentError):
                    await asyncio.to_thread(self.backend.thaw, cell)
                self.host.post(e, Event.STOP_REQUESTED)
