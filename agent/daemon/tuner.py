"""The tuner service: agent/core/tuner.py's decisions wired to the kernel and the loop.

For every RUNNING cell it waits on three sources, all on the asyncio loop: PSI
triggers on the cell's ``cpu.pressure`` and ``memory.pressure``
(:class:`agent.kernel.psi.PsiWatcher`), ``memory.events`` (a kernfs file that signals
``EPOLLPRI`` when a counter moves; one small epoll per file, like the PSI triggers),
and samples, on one timer for all cells (``loop.call_later``) set to the earliest
cell's due time.  Samples serve the lowering only (:func:`agent.core.tuner.wants_samples`):
a cell at its lower bounds, or pinned, is not sampled at all while its triggers are
armed, and a cell whose samples change nothing is sampled less and less often
(:func:`agent.core.tuner.next_interval`: ``sample_s`` doubling up to ``sample_max_s``).
So with every cell settled, nothing polls: the tuner sleeps until a trigger or a
memory event fires.  A sample is four ``pread`` calls on files kept open
(:class:`agent.kernel.knobs.SampleReader`).  Each observation
goes through :func:`agent.core.tuner.decide`; its actions are carried out in list order:
cgroup writes through :class:`agent.kernel.knobs.Knobs`, ``Budget.replace`` on the manager's
budget, and for each one a ``tuner`` event and a ``tuner`` journal record.

Where the kernel has no PSI (cgroup v1, ``psi=0``) the tuner degrades to samples, and on
v1 to the memory controller's ``memory.pressure_level`` eventfd (docs/tuner.md).

Tuning starts when the manager publishes a lifecycle event for a cell that is RUNNING
and stops when the cell leaves RUNNING (a bus sink; no change to the manager).  At start
the cell is brought to ``initial_size``: its maximum by default (``TunerConfig.start``;
"low": the lower bounds or what it uses plus headroom), and admission is made to hold
that commitment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from agent.core import tunerstate as ts
from agent.core.budget import Amount
from agent.core.cell import State
from agent.core.errors import AgentError, NotFoundError
from agent.core.events import Event, Severity
from agent.core.tuner import (
    PinRefused,
    check_pin,
    commitment,
    decide,
    high_for,
    initial_size,
    next_interval,
    pin,
    unpin,
    wants_samples,
)
from agent.core.tunerstate import (
    DEFAULT_CONFIG,
    Action,
    Bounds,
    BudgetGate,
    MemoryEvents,
    Observation,
    PressureTriggered,
    Resource,
    Sample,
    Size,
    TunerConfig,
    TunerState,
)
from agent.daemon.cells import CellEntry, CellsHost, Tuned
from agent.kernel.cgroup import CgroupBackend
from agent.kernel.knobs import Knobs, PriWatch
from agent.kernel.psi import PsiWatcher

__all__ = ["Tuner"]

log = logging.getLogger(__name__)
_RESOURCES: dict[str, Resource] = {"cpu": "cpu", "memory": "memory"}


class Tuner:
    """The tuner of one agentd.  ``attach()`` subscribes it to lifecycle events."""

    def __init__(self, host: CellsHost, backend: CgroupBackend, loop: asyncio.AbstractEventLoop,
                 *, config: TunerConfig = DEFAULT_CONFIG, sample_s: float = 5.0,
                 stall_us: int = 150_000, window_us: int = 1_000_000, triggers: bool = True,
                 sample_max_s: float = 60.0, quiet: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.backend = backend
        self.knobs = Knobs(backend)
        self.loop = loop
        self.config = config
        self.sample_s = sample_s
        self.sample_max_s = max(sample_s, sample_max_s)
        self.quiet = quiet  # None: a cell goes quiet only if its triggers are armed
        self.stall_us, self.window_us = stall_us, window_us
        self.triggers = triggers  # False: samples only (a fake cgroupfs has no PSI)
        self.clock = clock
        # the cells this tuner has started (each also CellEntry.tuned): closed at stop
        self.cells: dict[str, Tuned] = {}
        self.psi = PsiWatcher(loop, self._on_psi, self._on_psi_gone)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self.wakeups = 0   # observations handled (for the benchmark)
        self.samples = 0

    # ------------------------------------------------------------------ lifecycle hooks
    def attach(self) -> None:
        self.host.bus.add_sink(self._on_event, all_events=True)
        self.reconcile()

    def _on_event(self, ev: Event) -> None:
        if ev.channel == "lifecycle" and ev.cell is not None:
            self.reconcile(ev.cell)

    def reconcile(self, cell: str | None = None) -> None:
        """Tune exactly the cells that are RUNNING with a pid."""
        names = [cell] if cell is not None else sorted(set(self.host.cells) | set(self.cells))
        for name in names:
            e = self.host.cells.get(name)
            running = e is not None and e.state is State.RUNNING and e.pid is not None
            if running and name not in self.cells:
                try:
                    self.start(name)
                except (AgentError, OSError) as exc:
                    log.error("cell %s: tuning not started: %s", name, exc)
                    self._emit(name, "error", "notice", op="start", error=str(exc))
            elif not running and name in self.cells:
                self.stop(name)

    def start(self, cell: str) -> Tuned:
        e = self.host.cells[cell]
        r = e.manifest.resources
        bounds = Bounds.from_resources(r, self.config)
        st = self.backend.stats(cell)
        now = self.clock()
        kept = self._kept_pin(cell, e, bounds, st.memory_current)
        size = kept or initial_size(bounds, st.memory_current, self.config)
        held = self.host.ledger.get(cell) or Amount(r.cpu_min, r.memory_min, r.pids_max)
        want = commitment(size, held.pids)
        try:
            self.host.ledger.replace(cell, want)
            held = want
        except AgentError as exc:  # not admitted (adopted) or no room: hold what it has
            self._emit(cell, "refused", "notice", reason="start", error=str(exc))
        state = TunerState(cell, size, held, pinned=kept is not None,
                           events=MemoryEvents.from_counters(st.memory_events, now),
                           last_sample=Sample.from_stats(st, now))
        t = Tuned(cell, bounds, state, r.priority, r.cpu_min, [], interval=self.sample_s)
        self.knobs.set_memory(cell, size.memory_high, size.memory_max)
        self.knobs.set_cpu_max(cell, size.cpu)
        self.cells[cell] = t
        e.tuned = t
        self._arm(t)
        try:
            t.reader = self.knobs.sample_reader(cell)
        except AgentError as exc:
            log.info("cell %s: samples through the backend: %s", cell, exc)
        self._emit(cell, "start", "info", size=size.to_wire(), held=held.to_wire(),
                   bounds=bounds.to_wire(), sources=list(t.sources), pinned=kept is not None)
        self._record(cell, "start", {"size": size.to_wire(), "held": held.to_wire()})
        self._plan(t)
        return t

    def _kept_pin(self, cell: str, e: CellEntry, bounds: Bounds, in_use: int) -> Size | None:
        """The operator's pin journaled with the cell (agent.daemon.manager.CellManager.keep_pin),
        if it still fits the manifest's bounds and the cell's use; else it is dropped."""
        p = e.pin
        if not p:
            return None
        size = Size(p["cpu"], p["memory_high"], p["memory_max"])
        try:
            check_pin(cell, size, bounds, in_use)
        except PinRefused as exc:
            self._emit(cell, "unpin", "notice",
                       reason=f"the kept pin no longer fits: {exc.message}")
            self.host.keep_pin(cell, None)
            return None
        return size

    def _arm(self, t: Tuned) -> None:
        cell = t.cell
        for res in ("cpu", "memory"):
            path = self.knobs.pressure_path(cell, res)
            if path is None or not self.triggers:
                continue
            try:
                self.psi.add(cell, res, str(path), self.stall_us, self.window_us)
                t.sources.append(f"psi:{res}")
            except (AgentError, OSError) as exc:
                log.info("cell %s: no PSI trigger on %s (samples only): %s", cell, res, exc)
        ev_path = self.knobs.events_path(cell)
        if ev_path is not None:
            try:
                t.events_watch = PriWatch(self.loop, str(ev_path),
                                          lambda text: self._on_events_text(cell, text))
                t.sources.append("memory.events")
            except OSError as exc:
                log.info("cell %s: memory.events not watched: %s", cell, exc)
        if "psi:memory" not in t.sources:
            with contextlib.suppress(AgentError, OSError):
                fd = self.backend.memory_pressure_fd(cell)
                t.v1_fd = fd
                self.loop.add_reader(fd, self._on_v1_pressure, cell)
                t.sources.append("v1:pressure")

    def stop(self, cell: str) -> None:
        t = self.cells.pop(cell, None)
        if t is None:
            return
        e = self.host.cells.get(cell)
        if e is not None and e.tuned is t:
            e.tuned = None
        self.psi.remove(cell)
        if t.events_watch is not None:
            t.events_watch.close()
        if t.v1_fd is not None:
            self.loop.remove_reader(t.v1_fd)
            os.close(t.v1_fd)
        if t.reader is not None:
            t.reader.close()
        self._emit(cell, "stop", "info")
        self._schedule()

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.host.bus.remove_sink(self._on_event)
        for cell in list(self.cells):
            self.stop(cell)
        self.psi.close()

    # ------------------------------------------------------------------ observations
    def _on_psi(self, cell: str, resource: str) -> None:
        res = _RESOURCES.get(resource)
        if res is not None:
            self.observe(cell, PressureTriggered(res, self.clock()))
            self._pressure(cell, res)

    def _pressure(self, cell: str, res: Resource) -> None:
        """``tuner/pressure``: the cell's trigger fired (at most once per window per
        resource), with its ``some avg10`` when the file reads (channel 4 counts cells
        under pressure together: pressure-from-many)."""
        self._emit(cell, "pressure", "info", resource=res,
                   avg10=self.knobs.pressure_avg10(cell, res))

    def _on_psi_gone(self, cell: str, resource: str) -> None:
        log.info("cell %s: %s pressure file gone", cell, resource)

    def _on_v1_pressure(self, cell: str) -> None:
        t = self.cells.get(cell)
        if t is None or t.v1_fd is None:
            return
        with contextlib.suppress(BlockingIOError):
            os.read(t.v1_fd, 8)
        self.observe(cell, PressureTriggered("memory", self.clock()))
        self._pressure(cell, "memory")

    def _on_events_text(self, cell: str, text: str) -> None:
        counts: dict[str, int] = {}
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                counts[k] = int(v)
        self.observe(cell, MemoryEvents.from_counters(counts, self.clock()))

    # ------------------------------------------------------------------ samples
    def wants_samples(self, t: Tuned) -> bool:
        quiet = t.triggered if self.quiet is None else self.quiet
        return not quiet or wants_samples(t.state, t.bounds)

    def _plan(self, t: Tuned, *, soon: bool = False) -> None:
        """(Re)decide when the cell is next sampled; ``soon``: back to ``sample_s``."""
        if soon:
            t.interval = self.sample_s
        if not self.wants_samples(t):
            t.due = None
        elif t.due is None or soon:
            due = self.clock() + t.interval
            t.due = due if t.due is None else min(t.due, due)
        self._schedule()

    def _schedule(self) -> None:
        """One timer, at the earliest due sample; none while every cell is quiet."""
        due = min((t.due for t in self.cells.values() if t.due is not None),
                  default=float("inf"))
        if due == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = due
        if due != float("inf"):
            self._timer = self.loop.call_later(max(0.0, due - self.clock()), self._tick)

    def _tick(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        now = self.clock()
        for t in [t for t in self.cells.values() if t.due is not None and t.due <= now + 0.05]:
            self.sample(t.cell)
        self._schedule()

    def sample_all(self) -> None:
        """Sample every tuned cell now (tests; the timer samples only the due ones)."""
        for cell in list(self.cells):
            self.sample(cell)
        self._schedule()

    def sample(self, cell: str) -> None:
        """One sample of the cell (memory.events read too where it is not watched); then
        the cell's next due time (:func:`agent.core.tuner.next_interval`)."""
        t = self.cells.get(cell)
        if t is None:
            return
        now = self.clock()
        try:
            if t.reader is not None and t.events_watch is not None:
                smp = t.reader.read(now)
            else:
                st = self.backend.stats(cell)
                if t.events_watch is None:
                    self.observe(cell, MemoryEvents.from_counters(st.memory_events, now))
                smp = Sample.from_stats(st, now)
        except (AgentError, OSError) as exc:
            log.debug("cell %s: no sample: %s", cell, exc)
            t.due = now + self.sample_max_s  # gone, or about to be: the lifecycle says
            return
        self.samples += 1
        before = t.state
        acted = bool(self.observe(cell, smp))
        if self.cells.get(cell) is not t:
            return
        t.interval = next_interval(t.interval, before, t.state, acted, t.bounds,
                                   self.sample_s, self.sample_max_s, self.config)
        t.due = now + t.interval if self.wants_samples(t) else None

    def observe(self, cell: str, obs: Observation) -> list[Action]:
        """Feed one observation to ``decide`` and carry out its actions."""
        t = self.cells.get(cell)
        if t is None:
            return []
        self.wakeups += 1
        if isinstance(obs, Sample):
            t.prev_sample = t.state.last_sample
        if self._level(cell) != "none":  # escalated by the reclaim loop: keep baselines only
            if isinstance(obs, Sample):
                t.state = replace(t.state, last_sample=obs)
            elif isinstance(obs, MemoryEvents):
                t.state = replace(t.state, events=obs)
            return []
        state, actions = decide(t.state, obs, t.bounds, BudgetGate(self.host.ledger.budget),
                                self.clock(), self.config)
        t.state = state
        self.apply(cell, actions)
        if not isinstance(obs, Sample) and cell in self.cells:
            self._plan(t, soon=bool(actions))  # a raise: lowering may follow, sample again
        return actions

    # ------------------------------------------------------------------ effects
    def apply(self, cell: str, actions: list[Action]) -> None:
        for a in actions:
            try:
                self._carry_out(cell, a)
            except (AgentError, OSError) as exc:
                log.error("cell %s: tuner %s failed: %s", cell, type(a).__name__, exc)
                self._emit(cell, "error", "notice", action=type(a).__name__, error=str(exc))
                self._resync(cell)
                return
            sev: Severity = "notice" if isinstance(a, ts.RecordRefusal) or a.reason.startswith(
                "rollback") else "info"
            attrs = a.attrs()
            self._emit(cell, a.kind, sev, **attrs)
            self._record(cell, a.kind, attrs)

    def _carry_out(self, cell: str, a: Action) -> None:
        k = self.knobs
        if isinstance(a, ts.SetCpuMax):
            k.set_cpu_max(cell, a.new)
        elif isinstance(a, ts.SetMemoryHigh):
            k.set_memory_high(cell, a.new)
        elif isinstance(a, ts.SetMemoryMax):
            k.set_memory_max(cell, a.new)
        elif isinstance(a, ts.SetLimits):
            k.set_memory(cell, a.new.memory_high, a.new.memory_max, a.old.memory_max)
            k.set_cpu_max(cell, a.new.cpu)
        elif isinstance(a, ts.Commit):
            self.host.ledger.replace(cell, a.new)

    def _resync(self, cell: str) -> None:
        """After a failed write the state no longer matches the cgroup: start over."""
        if cell in self.cells:
            self.stop(cell)
            self.reconcile(cell)

    def _emit(self, cell: str, kind: str, severity: Severity, **attrs: Any) -> None:
        self.host.bus.emit("tuner", kind, cell=cell, severity=severity, **attrs)

    def _record(self, cell: str, kind: str, attrs: Mapping[str, Any]) -> None:
        j = self.host.journal
        if j is not None:
            try:
                j.append("tuner", {"cell": cell, "kind": kind, **attrs}, sync=False)
            except (AgentError, OSError) as exc:
                log.error("tuner journal record not written: %s", exc)

    # ------------------------------------------------------------------ operator and reclaim
    def _level(self, cell: str) -> str:
        """The reclaim loop's rung for the cell (not "none": the tuner holds off)."""
        e = self.host.cells.get(cell)
        return e.rung.level if e is not None else "none"

    def get(self, cell: str) -> Tuned:
        t = self.cells.get(cell)
        if t is None:
            raise NotFoundError("E_NOT_FOUND", f"cell `{cell}` is not being tuned",
                                "only running cells are tuned: agentctl ps")
        return t

    def pin(self, cell: str, cpu: int | None = None, memory: int | None = None) -> Size:
        """Fix the size (PinRefused if it does not fit); ``None`` keeps that resource."""
        t = self.get(cell)
        s = t.state.size
        size = Size(s.cpu if cpu is None else cpu,
                    s.memory_high if memory is None else high_for(memory, t.bounds, self.config),
                    s.memory_max if memory is None else memory)
        state, actions = pin(t.state, size, t.bounds, BudgetGate(self.host.ledger.budget))
        self.host.keep_pin(cell, state.size.to_wire())  # journaled first (E_JOURNAL_FULL: no pin)
        t.state = state
        self.apply(cell, actions)
        self._plan(t)
        return state.size

    def unpin(self, cell: str) -> None:
        t = self.get(cell)
        self.host.keep_pin(cell, None)
        t.state = unpin(t.state)
        self._emit(cell, "unpin", "info")
        self._record(cell, "unpin", {})
        self._plan(t, soon=True)

    def set_held(self, cell: str, held: Amount) -> None:
        t = self.cells.get(cell)
        if t is not None:
            t.state = replace(t.state, held=held)

