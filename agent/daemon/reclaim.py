"""The host's reclaim loop as a service: agent/core/reclaim.py's passes, run when useful.

A pass builds a :class:`~agent.core.reclaim.CellView` per tuned cell (from the tuner's state)
and a :class:`~agent.core.reclaim.BoxView` (``/proc/pressure/memory``, the journaled cells and,
when a scan is due, the agent-owned kernel objects found by
:class:`~agent.kernel.orphans.KernelObjects`), runs :func:`~agent.core.reclaim.reclaim_pass` and
carries out its actions in order, each a ``reclaim`` event and (except weights) a journal
record; a pass that did anything ends with a ``reclaim``/``pass`` summary event.
Blocking work (the netlink scan, orphan teardown, freeze) runs in a worker thread.

Passes are driven by events, not by a clock: one at start (weights, and the orphan scan
that finds what a killed agentd left), one shortly after each lifecycle change (weights;
a scan for what a teardown left) or tuner resize (budget), and one when the box's PSI
trigger on ``/proc/pressure/memory`` fires (``some`` stalls of ``pressure_on_avg10`` % of
a 1 s window).  After each pass :func:`~agent.core.reclaim.next_pass_at` says when the next
one could do something by itself (a rung of the escalation ladder, a lowering settling,
an orphan's grace ending, an idle cell's reclaim interval); with nothing pending, no
timer is set.  Without PSI on the box the loop degrades to a pass every ``period_s``.
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
from typing import Any

from agent.core.errors import AgentError
from agent.core.events import Event as BusEvent
from agent.core.events import Severity
from agent.core.lifecycle import Event
from agent.core.names import veth_names
from agent.core.reclaim import (
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
    apply,
    next_pass_at,
    reclaim_pass,
    summarize,
)
from agent.core.tuner import commitment, settled
from agent.daemon.cells import CellsHost, Rung, TunerView
from agent.kernel.cgroup import CgroupBackend
from agent.kernel.orphans import KernelObjects
from agent.kernel.psi import BOX_MEMORY_PRESSURE, BoxMemoryPressure, PsiWatcher

__all__ = ["Reclaimer"]

log = logging.getLogger(__name__)
DEFAULT_CONFIG = ReclaimConfig()


def _has_memory_reclaim(backend: CgroupBackend) -> bool:
    try:  # agent.kernel.cgroupdetect needs cgroupspy (the v1 backend)
        from agent.kernel.cgroupdetect import features
    except ImportError:
        return (Path(backend.root) / "memory.reclaim").exists()
    return "memory.reclaim" in features(backend)


@dataclass
class Reclaimer:
    """The loop.  ``objects`` None: no orphan scan (tests, or no bridge).
    ``box_trigger``: arm the PSI trigger on the box's memory pressure (False: tests)."""

    host: CellsHost
    tuner: TunerView
    backend: CgroupBackend
    loop: asyncio.AbstractEventLoop
    objects: KernelObjects | None = None
    config: ReclaimConfig = DEFAULT_CONFIG
    period_s: float = 10.0
    scan_s: float = 30.0
    box_pressure: Callable[[], float | None] = field(default_factory=BoxMemoryPressure)
    clock: Callable[[], float] = time.monotonic
    box_trigger: bool = True
    pressure_path: str = BOX_MEMORY_PRESSURE
    seen: dict[tuple[str, str], float] = field(default_factory=dict)
    passes: int = 0
    _timer: asyncio.TimerHandle | None = None
    _timer_at: float = math.inf
    _task: asyncio.Task[None] | None = None
    _last_scan: float = -math.inf
    _last_pass: float = -math.inf
    _scan_wanted: bool = True
    _candidates: tuple[KernelObject, ...] = ()
    _closed: bool = False
    _has_reclaim: bool | None = None
    _psi: PsiWatcher | None = None
    _polled: bool = False
    _after: tuple[float, list[CellView], float | None] | None = None  # the last pass's end:
    # (its time, the views with its actions applied, the box pressure it read)

    def start(self) -> None:
        """Arm the box trigger, subscribe to the bus, and run the first pass."""
        self._polled = not self.box_trigger
        if self.box_trigger:
            self._psi = PsiWatcher(self.loop, lambda *_: self._pressure())
            stall = int(self.config.pressure_on_avg10 / 100 * 1_000_000)
            try:
                self._psi.add("box", "memory", self.pressure_path, max(1, stall), 1_000_000)
            except (AgentError, OSError) as exc:
                log.info("no PSI trigger on %s (a reclaim pass every %gs instead): %s",
                         self.pressure_path, self.period_s, exc)
                self._psi.close()
                self._psi = None
                self._polled = True
        self.attach()
        self.poke(min(self.period_s, 1.0))

    def attach(self) -> None:
        """Be poked by lifecycle changes and tuner resizes."""
        self.host.bus.add_sink(self._on_event, all_events=True)

    @property
    def polled(self) -> bool:
        """No box trigger: passes every ``period_s`` (the documented degradation)."""
        return self._polled

    def _on_event(self, ev: BusEvent) -> None:
        if ev.channel == "lifecycle":
            self._scan_wanted = True
            self.poke(0.5)
        elif (ev.channel == "tuner" and ev.kind == "resize"
              and isinstance(ev.attrs.get("new"), int) and isinstance(ev.attrs.get("old"), int)
              and ev.attrs["new"] < ev.attrs["old"]):
            self.poke(1.0)  # a lowering: budget may be returned (the only thing it changes)

    def _pressure(self) -> None:
        self.poke(max(0.0, self._last_pass + self.period_s - self.clock()))

    def poke(self, delay: float = 0.0) -> None:
        """Run a pass in ``delay`` seconds at the latest."""
        self._arm(self.clock() + delay)

    def _arm(self, at: float) -> None:
        if self._closed or at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_later(max(0.0, at - self.clock()), self._due)

    def _due(self) -> None:
        self._timer, self._timer_at = None, math.inf
        if self._task is not None and not self._task.done():
            self.poke(0.2)  # a pass is running (blocking work in a thread): right after
            return
        self._task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        nxt: float | None = None
        try:
            await self.run_pass()
            nxt = self.next_pass()
        except Exception as exc:  # a failing pass is an event; the loop keeps going
            log.exception("reclaim pass failed")
            self.host.bus.emit("reclaim", "error", severity="notice", error=str(exc))
            nxt = self.clock() + self.period_s
        if nxt is not None:
            self._arm(nxt)

    def next_pass(self) -> float | None:
        """When the next pass is due by itself (None: only an event brings one), from
        what the last pass left (nothing is read again); before any pass, from now."""
        if self._after is not None:
            now, views, avg10 = self._after
        else:
            now = self.clock()
            views, avg10 = self.views(now), self.box_pressure()
        box = BoxView(avg10, bool(self._has_reclaim), frozenset(self.host.cells),
                      self._candidates)
        due = [next_pass_at(views, box, now, self.period_s, self.config)]
        if self.polled:
            due.append(now + self.period_s)
        if self._scan_wanted and self.objects is not None:  # held back by scan_s
            due.append(max(now, self._last_scan + self.scan_s))
        return min((d for d in due if d is not None), default=None)

    async def close(self) -> None:
        self._closed = True
        with contextlib.suppress(ValueError):
            self.host.bus.remove_sink(self._on_event)
        if self._psi is not None:
            self._psi.close()
        if isinstance(self.box_pressure, BoxMemoryPressure):
            self.box_pressure.close()
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ------------------------------------------------------------------ views
    def _weight(self, cell: str, rung: Rung) -> int:
        if rung.weight is None:  # read once; after that the loop knows what it wrote
            rung.weight = self.tuner.knobs.cpu_weight(cell) or 100
        return rung.weight

    def views(self, now: float) -> list[CellView]:
        out = []
        tuned = self.tuner.cells
        for name, e in self.host.cells.items():
            if name not in tuned and e.rung != Rung():
                e.rung = Rung()  # no longer tuned: its ladder starts over
        for cell, t in sorted(tuned.items()):
            entry = self.host.cells.get(cell)
            if entry is None:
                continue
            s, smp, rung = t.state, t.state.last_sample, entry.rung
            out.append(CellView(
                cell, t.priority, t.cpu_min, t.bounds.cpu_lo, t.bounds.memory_lo, s.held,
                commitment(s.size, s.held.pids), settled(s, now), s.memory_idle >= 2,
                smp.memory_current if smp else 0, s.size.cpu, s.size.memory_high,
                self._weight(cell, rung), rung.level, rung.since, rung.last_reclaim_at,
                s.watch.until if s.watch is not None else -math.inf))
        return out

    def _scan_due(self, now: float) -> bool:
        if self.objects is None:
            return False
        grace_over = any(now >= o.seen_since + self.config.orphan_grace_s
                         for o in self._candidates)
        return grace_over or (self._scan_wanted and now - self._last_scan >= self.scan_s)

    async def _scan(self, now: float) -> tuple[KernelObject, ...]:
        if not self._scan_due(now):
            return ()
        assert self.objects is not None
        self._last_scan, self._scan_wanted = now, False
        owners = {e.alloc.vlan: name for name, e in self.host.cells.items()
                  if getattr(e, "alloc", None) is not None and e.alloc.vlan is not None}
        # The scan runs in a thread while cells come and go: a cell journaled when it
        # starts or when it ends owns what it found (a cell destroyed meanwhile left a
        # stale sighting of objects its destroy removed, names its next start reuses).
        journaled = set(self.host.cells)
        found = await asyncio.to_thread(self.objects.scan, owners)
        journaled |= set(self.host.cells)
        # a veth between `link add` and the alias naming its cell: its name is the cell's
        by_veth = {v: c for c in journaled for v in veth_names(c)}
        found = [(k, n, by_veth.get(n) if k == "veth" and c is None else c)
                 for k, n, c in found]
        # An object's orphan age runs while scans see it with no journaled owner; seen
        # owned, it starts over (the names of a cell's objects outlive its destroys).
        unowned = {(k, n) for k, n, c in found if c is None or c not in journaled}
        self.seen = {k: v for k, v in self.seen.items() if k in unowned}
        out = []
        for kind, name, cell in found:
            since = self.seen.setdefault((kind, name), now) if (kind, name) in unowned else now
            out.append(KernelObject(kind, name, cell, since))
        # what later passes must look at again: objects no journaled cell owns
        self._candidates = tuple(o for o in out if (o.kind, o.name) in unowned)
        return tuple(out)

    # ------------------------------------------------------------------ one pass
    async def run_pass(self) -> list[Action]:
        now = self.clock()
        self.passes += 1
        self.tuner.reconcile()  # a safety net for a missed lifecycle event
        self._last_pass = now
        objects = await self._scan(now)
        if self._has_reclaim is None:
            self._has_reclaim = _has_memory_reclaim(self.backend)
        box = BoxView(self.box_pressure(), self._has_reclaim, frozenset(self.host.cells), objects)
        views = self.views(now)
        actions = reclaim_pass(views, box, now, self.config)
        done: list[Action] = []
        for a in actions:
            try:
                if not await self._carry_out(a, now):
                    continue  # no longer to be done
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
        for a in done:
            views = [apply(v, a, now) for v in views]
        self._after = (now, views, box.memory_some_avg10)
        taken = {(a.object_kind, a.name) for a in done if isinstance(a, CollectOrphan)}
        self._candidates = tuple(o for o in self._candidates if (o.kind, o.name) not in taken)
        if done:
            summary: dict[str, Any] = summarize(done).attrs()
            self.host.bus.emit("reclaim", "pass", severity="info", **summary)
        return done

    def _rung(self, cell: str) -> Rung:
        e = self.host.cells.get(cell)
        return e.rung if e is not None else Rung()

    def _level(self, cell: str, level: Level, now: float) -> None:
        r = self._rung(cell)
        r.level, r.since = level, now

    async def _collect(self, a: CollectOrphan) -> bool:
        """Collect an orphan, by name.  With an owner: under the manager's lock of that
        cell and only if it is still not journaled, so no start of a cell of that name
        (which makes objects of the same names) runs meanwhile.  False: not collected."""
        assert self.objects is not None
        if a.cell is None:
            await asyncio.to_thread(self.objects.collect, a)
        else:
            async with self.host.cell_lock(a.cell):
                if a.cell in self.host.cells:
                    log.info("reclaim: %s %s kept: cell %s is journaled again",
                             a.object_kind, a.name, a.cell)
                    return False
                await asyncio.to_thread(self.objects.collect, a)
        self.seen.pop((a.object_kind, a.name), None)
        return True

    async def _carry_out(self, a: Action, now: float) -> bool:
        k, cell = self.tuner.knobs, a.cell or ""
        if isinstance(a, CollectOrphan):
            return await self._collect(a)
        elif isinstance(a, ReturnBudget):
            self.host.ledger.replace(cell, a.new)
            self.tuner.set_held(cell, a.new)
        elif isinstance(a, MemoryReclaim):
            self._rung(cell).last_reclaim_at = now
            await asyncio.to_thread(k.reclaim, cell, a.bytes)
        elif isinstance(a, SetCpuWeight):
            k.set_cpu_weight(cell, a.new)
            self._rung(cell).weight = a.new
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
        return True
