"""The cell manager's start: replay the journal, repair half-made plans, and re-adopt or
clean up every journaled cell (docs/master.md, "adoption").

A mixin of :class:`agent.daemon.manager.CellManager`: it runs once, at agentd's start
(and, to come, after the master's respawn), over the manager's own state, which it
declares below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from agent.core import cellrecord as cellstate
from agent.core.addrpool import AddrPool
from agent.core.budget import Ledger, Request
from agent.core.cell import Exit
from agent.core.cellctx import Context
from agent.core.errors import AgentError
from agent.core.lifecycle import LEAVING, LIVE, Event, adoption
from agent.core.plan import Executor
from agent.daemon.bus import EventBus
from agent.daemon.cells import CellEntry
from agent.kernel.cgroup import CgroupBackend
from agent.kernel.journal import LockedJournal

__all__ = ["Adoption"]

log = logging.getLogger(__name__)


class Adoption:
    """Start-up recovery of the cells a previous agentd left (a mixin: see module doc)."""

    executor: Executor | None
    journal: LockedJournal | None
    pool: AddrPool
    cells: dict[str, CellEntry]
    ledger: Ledger
    bus: EventBus
    ctx: Context
    cgroup: CgroupBackend
    remove_gateways: bool
    spawner: Any

    def post(self, e: CellEntry, ev: Event | Exit, error: str | None = None,
             pid: int | None = None) -> None:
        raise NotImplementedError

    async def refresh_firewall(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """Replay the journal, repair half-made plans, re-adopt or clean up cells."""
        assert self.executor is not None and self.journal is not None
        state = cellstate.replay(self.journal.replay())
        plans = self.executor.recover()
        reports = await asyncio.to_thread(self.executor.repair, plans)
        repaired = {r.target for r in reports}
        for r in reports:
            self.bus.emit("master", "repaired", cell=r.target, severity="notice",
                          plan=r.plan_id, undone=list(r.undone), errors=list(r.errors))
        # A lease is journaled before its cell's first record: agentd killed in between
        # leaves a lease no cell holds, which would refuse the name's next run for good.
        for cell in sorted(set(state.leases) - set(state.cells)):
            del state.leases[cell]
            self.bus.emit("master", "lease-dropped", cell=cell, severity="notice")
        snap = {"version": 1, "network": str(self.pool.config.network),
                "subnet_prefix": self.pool.config.subnet_prefix,
                "leases": [[d["cell"], d["vlan"], str(d["address"]).split("/")[0]]
                           for d in state.leases.values()]}
        try:
            self.pool = AddrPool.restore(self.pool.config, snap)
        except AgentError as exc:
            log.error("address leases not restored: %s", exc)
        for name, rec in state.cells.items():
            try:
                e = CellEntry.from_record(rec)
            except Exception as exc:
                log.error("journaled cell %s unreadable, skipped: %s", name, exc)
                continue
            self.cells[name] = e
            if e.cell.holds_budget:
                try:
                    self.ledger.admit(Request.from_manifest(e.manifest))
                except AgentError as exc:
                    log.error("cell %s: budget not restored: %s", name, exc)
            self._adopt(e, name in repaired)
        try:
            self.journal.compact()
        except AgentError as exc:  # full: serve anyway; appends say what they cannot keep
            log.error("journal not compacted at start: %s", exc)
            self.bus.emit("master", "journal-failed", severity="alert", code=exc.code,
                          error=exc.message)
        await self._drop_unheld_gateways()
        await self.refresh_firewall()

    async def _drop_unheld_gateways(self) -> None:
        """A create plan undone after a crash can leave its VLAN's gateway: its
        ensure-gateway step was in flight, so its undo had no record that it made the
        gateway (and a gateway may be shared, so undo never guesses).  At start every cell
        is known, so a gateway on a VLAN no cell holds is removed here."""
        lister = getattr(self.ctx.net, "gateway_vlans", None)
        if not self.remove_gateways or lister is None:
            return
        try:
            present: set[int] = await asyncio.to_thread(lister)
        except AgentError as exc:
            log.error("VLAN gateways not listed: %s", exc)
            return
        held = {e.alloc.vlan for e in self.cells.values()
                if e.alloc.vlan is not None and e.state not in LEAVING}
        for vlan in sorted(present - held):
            try:
                await asyncio.to_thread(self.ctx.net.remove_gateway, vlan)
                self.bus.emit("master", "gateway-collected", severity="notice", vlan=vlan)
            except AgentError as exc:
                log.error("VLAN %d gateway not removed: %s", vlan, exc)

    def _adopt(self, e: CellEntry, repaired: bool) -> None:
        procs: list[int] = []
        with contextlib.suppress(AgentError, OSError):
            procs = self.cgroup.procs(e.name)
        live = e.state in LIVE
        if live and procs:
            pid = e.pid if e.pid in procs else min(procs)
            try:
                self.spawner.adopt(e.name, pid)
                e.pid = pid
            except OSError as exc:
                log.error("cell %s: pid %d not adopted: %s", e.name, pid, exc)
                procs = []
        if live and not procs:
            e.pid = None
        for ev, why in adoption(e.cell, alive=bool(procs), repaired=repaired):
            self.post(e, ev, why)

