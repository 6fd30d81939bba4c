"""The cell manager's driver: each cell's events, one at a time, through the lifecycle
table (:func:`agent.core.lifecycle.transition`), and the effects carried out on the loop:
records journaled, events published, budget and lease released, restarts scheduled,
the service stopped, plans run in a worker thread, the firewall refreshed around them.

A mixin of :class:`agent.daemon.manager.CellManager` (like
:class:`agent.daemon.adoption.Adoption`): it works on the manager's own state, which it
declares below.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Mapping
from typing import Any

from agent.core import cell as fx  # the lifecycle's effects
from agent.core.addrpool import AddrPool
from agent.core.budget import Ledger
from agent.core.cell import Exit, RunPlan, State
from agent.core.config import AgentConfig
from agent.core.errors import AgentError
from agent.core.firewall import CellFw
from agent.core.lifecycle import (
    HOLDS_TABLE,
    IN_FIREWALL,
    LEAVING,
    PLAN_EVENTS,
    Event,
    LifecycleError,
    forgotten,
    transition,
)
from agent.core.plan import Executor
from agent.core.planner import plan_create, plan_destroy, plan_restart
from agent.daemon.bus import EventBus
from agent.daemon.cells import CellEntry
from agent.kernel.cgroup import CgroupBackend
from agent.kernel.journal import LockedJournal
from agent.kernel.nft import FirewallSync

__all__ = ["Driver", "cancel_timer"]

log = logging.getLogger("agent.daemon.manager")


class Driver:
    """Per-cell event processing and its effects (a mixin: see module doc)."""

    config: AgentConfig
    bus: EventBus
    cells: dict[str, CellEntry]
    ledger: Ledger
    pool: AddrPool
    cgroup: CgroupBackend
    spawner: Any
    firewall: FirewallSync | None
    executor: Executor | None
    journal: LockedJournal | None
    remove_gateways: bool
    clock: Callable[[], float]
    sigterm_caught: Callable[[int], bool]
    _fw_lock: asyncio.Lock
    _tasks: set[asyncio.Task[Any]]

    def _record(self, t: str, data: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def post(self, e: CellEntry, ev: Event | Exit, error: str | None = None,
             pid: int | None = None) -> None:
        """Queue an event for the cell's driver (one event at a time per cell)."""
        e.drive.queue.append((ev, error, pid))
        if e.drive.task is None or e.drive.task.done():
            e.drive.task = self._spawn_task(self._drive(e))

    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _drive(self, e: CellEntry) -> None:
        while e.drive.queue:
            ev, error, pid = e.drive.queue.popleft()
            if isinstance(ev, Exit) and pid is not None and pid != e.pid:
                continue  # an earlier run's pid 1
            try:
                await self._apply(e, ev, error)
            except LifecycleError as exc:
                log.debug("%s", exc)
            except Exception:
                log.exception("cell %s: event %s failed", e.name, ev)

    async def _apply(self, e: CellEntry, ev: Event | Exit, error: str | None = None) -> None:
        for plan in self._step(e, ev, error):
            await self._run_plan(e, plan)

    def _step(self, e: CellEntry, ev: Event | Exit, error: str | None) -> list[RunPlan]:
        """One transition: journal the record, carry out the effects on the loop, return
        the plans to run."""
        before = e.state
        new, effects = transition(e.cell, ev, self.clock(), error=error)
        e.cell = new
        if isinstance(ev, Exit):
            e.pid = None
        gone = forgotten(new)
        try:
            self._record("cell-gone" if gone else "cell",
                         {"name": e.name} if gone else e.to_record())
        except AgentError as exc:
            self._not_journaled(e, exc)
        plans: list[RunPlan] = []
        for eff in effects:
            if isinstance(eff, fx.Publish):
                self.bus.emit("lifecycle", eff.kind, cell=e.name, severity=eff.severity,
                              **eff.attrs_dict())
            elif isinstance(eff, fx.Release):
                self._release(e)
            elif isinstance(eff, fx.CancelRestart):
                cancel_timer(e.drive.restart_timer)
                e.drive.restart_timer = None
            elif isinstance(eff, fx.ScheduleRestart):
                self._schedule_restart(e, eff)
            elif isinstance(eff, fx.StopService):
                self._stop_service(e, eff.grace)
            elif isinstance(eff, RunPlan):
                plans.append(eff)
        if before is State.STOPPING and new.state is not State.STOPPING:
            cancel_timer(e.drive.kill_timer)
            e.drive.kill_timer = None
        if gone:
            self.cells.pop(e.name, None)
            cancel_timer(e.drive.restart_timer)
        e.drive.resolve_waiters(e.cell)
        return plans

    def _not_journaled(self, e: CellEntry, exc: AgentError) -> None:
        """The journal refused a cell's record (full, or its file system is): what it says
        has happened or is a consequence of what was journaled (a request is journaled
        before it is acted on: the lease, a plan's begin), so memory goes on and the
        journal is rewritten from memory at its next append (docs/reliability.md)."""
        assert self.journal is not None
        self.journal.mark_stale()
        log.error("cell %s: state %s not journaled: %s", e.name, e.state.value, exc)
        self.bus.emit("master", "journal-failed", cell=e.name, severity="alert",
                      code=exc.code, error=exc.message, state=e.state.value)

    def _release(self, e: CellEntry) -> None:
        self.ledger.release(e.name)
        if self.pool.lease(e.name) is not None:
            self.pool.release(e.name)
            try:
                self._record("lease-free", {"cell": e.name})
            except AgentError as exc:
                self._not_journaled(e, exc)

    def _schedule_restart(self, e: CellEntry, eff: fx.ScheduleRestart) -> None:
        loop = asyncio.get_running_loop()
        cancel_timer(e.drive.restart_timer)

        def due() -> None:
            e.drive.restart_timer = None
            if e.state is State.BACKOFF and e.cell.generation == eff.generation:
                self.post(e, Event.RESTART_DUE)

        e.drive.restart_timer = loop.call_at(loop.time() + max(0.0, eff.at - self.clock()), due)

    def _stop_service(self, e: CellEntry, grace: float) -> None:
        """SIGTERM pid 1, then the cgroup's kill after ``grace`` (at once if pid 1 has no
        SIGTERM handler: as a pid namespace's init it would ignore the signal)."""
        pid = e.pid
        if pid is None or not self.spawner.signal(e.name, signal.SIGTERM):
            self.post(e, Exit(), pid=None)  # nothing runs: the service is gone already
            return
        if not self.sigterm_caught(pid):
            grace = 0.0
        loop = asyncio.get_running_loop()
        cancel_timer(e.drive.kill_timer)
        e.drive.kill_timer = loop.call_later(grace, lambda: self._spawn_task(self._kill(e)))

    async def _kill(self, e: CellEntry) -> None:
        e.drive.kill_timer = None
        try:
            await asyncio.to_thread(self.cgroup.kill, e.name)
        except AgentError as exc:
            log.error("cell %s: %s", e.name, exc)

    def _fw_peers(self, exclude: str) -> list[CellFw] | None:
        """The networked cells the firewall rules are made for (None: no firewall)."""
        if self.firewall is None:
            return None
        return [fw for x in self.cells.values() if x.name != exclude and x.state in IN_FIREWALL
                and (fw := x.firewall_view()) is not None]

    async def refresh_firewall(self) -> None:
        """Rewrite the host table and the changed cell tables for the cells there are now."""
        if self.firewall is None:
            return
        async with self._fw_lock:
            cells = self._fw_peers("") or []
            tables = [x.name for x in self.cells.values() if x.state in HOLDS_TABLE]
            try:
                errors = await asyncio.to_thread(self.firewall.refresh, cells, tables)
            except AgentError as exc:
                errors = [exc.message]
            for err in errors:
                log.error("firewall: %s", err)
                self.bus.emit("master", "firewall-failed", severity="alert", error=err)

    async def _run_plan(self, e: CellEntry, eff: RunPlan) -> None:
        assert self.executor is not None
        await self.refresh_firewall()  # a cell being destroyed is no longer in the rules
        if eff.purpose == "destroy":
            # The last cell on a VLAN takes the VLAN's gateway with it (net.ensure_bridge
            # pins the bridge's MAC, so a later `vid N self` add works again).
            # Cells on their way out do not keep the gateway: when the last two cells of a
            # VLAN are stopped at once, each destroy plan would otherwise see the other and
            # neither would remove it (removal is idempotent, so both may).
            plan = plan_destroy(e.manifest, self.config, e.alloc,
                                last_on_vlan=self.remove_gateways and not any(
                                    x.alloc.vlan == e.alloc.vlan for x in self.cells.values()
                                    if x is not e and x.state not in LEAVING))
        else:
            if eff.purpose == "create":
                plan = plan_create(e.manifest, e.alloc, self.config,
                                   peers=self._fw_peers(e.name))
                e.plan_lines = plan.explain()
            else:
                plan = plan_restart(e.manifest, e.alloc, self.config)
        events = PLAN_EVENTS[eff.purpose]
        if events.start is not None:
            await self._apply(e, events.start)
        try:
            undo = await asyncio.to_thread(self.executor.run, plan)
        except AgentError as exc:  # PlanError, or the journal refused the plan's begin
            e.last_error = exc
            await self._apply(e, events.failed, exc.message)
            await self.refresh_firewall()
            return
        if eff.purpose != "destroy":
            pid = undo[-1].get("pid") if undo else None
            e.pid = pid if isinstance(pid, int) else None
        await self._apply(e, events.done)
        await self.refresh_firewall()  # peers' tables and the host table learn the cell


def cancel_timer(handle: asyncio.TimerHandle | None) -> None:
    if handle is not None:
        handle.cancel()
