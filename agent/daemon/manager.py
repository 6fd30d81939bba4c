"""The master's cell manager: control ops -> checks -> lifecycle -> journaled plans.

``run NAME``: manifest ``<services_dir>/NAME.toml`` -> policy (the peer's kernel uid/gid)
-> image check -> admission (budget, host PSI) -> address lease -> ADMIT -> the create
plan in a worker thread (journaled by the executor) -> RUNNING.  Every lifecycle effect
(agent.core.lifecycle) is carried out here; every record change is journaled (agent.core.cellrecord)
and published on the bus (channel ``lifecycle``).  State lives on the loop: plans run in
``asyncio.to_thread`` and only their outcome comes back to the loop.  Events of one cell
are processed one at a time by that cell's driver task; different cells run concurrently.
docs/master.md has the request flow, the journal records and the adoption rules.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from agent.core import datavol
from agent.core.addrpool import AddrPool, PoolConfig
from agent.core.budget import Amount, Budget, HostPressure, Ledger, Request
from agent.core.cell import (
    Cell,
    CellPolicy,
    Exit,
    State,
)
from agent.core.cellctx import CellNet, Context, Paths
from agent.core.cellrecord import reserve_amount
from agent.core.config import AgentConfig
from agent.core.errors import AgentError, NotFoundError, StateError
from agent.core.events import Event as BusEvent
from agent.core.lifecycle import IN_FLIGHT, LEAVING, Event
from agent.core.logbuf import LogBuffer
from agent.core.manifest import Manifest, load_manifest
from agent.core.names import check_cell_name
from agent.core.plan import Executor, PlanEvent
from agent.core.planner import Allocation, plan_create
from agent.core.policy import Policy
from agent.core.slots import SLOT_RECORD, SlotTable
from agent.daemon.adoption import Adoption
from agent.daemon.bus import EventBus
from agent.daemon.cells import CellEntry, ExitCallback
from agent.daemon.driver import Driver, cancel_timer
from agent.kernel.cgroup import CgroupBackend
from agent.kernel.dirs import CellDirs
from agent.kernel.host import sigterm_caught as default_sigterm_caught
from agent.kernel.image import check_image
from agent.kernel.journal import Journal, LockedJournal, Record, encode_record
from agent.kernel.nft import FirewallSync

__all__ = ["CellManager", "ManagedSpawner"]

log = logging.getLogger(__name__)
_STATE_KINDS = (*(s.value for s in State), "adopted", "refused")


class ManagedSpawner(Protocol):
    def start(self, cell: str, spec: Any) -> int: ...
    def stop(self, cell: str, pid: int | None) -> None: ...
    def adopt(self, cell: str, pid: int) -> None: ...
    def signal(self, cell: str, sig: int) -> bool: ...
    def logs(self, cell: str) -> LogBuffer | None: ...
    def close(self) -> None: ...



class CellManager(Driver, Adoption):
    """Owns the cells of one agentd.  ``make_spawner(on_exit)`` builds the spawner."""

    def __init__(self, config: AgentConfig, bus: EventBus, policy: Policy, *,
                 cgroup: CgroupBackend, net: CellNet,
                 make_spawner: Callable[[ExitCallback], ManagedSpawner],
                 capacity: Amount, pressure: Callable[[], HostPressure | None] = lambda: None,
                 fs_root: str = "/", clock: Callable[[], float] = time.time,
                 stop_grace_ms: int | None = None,
                 sigterm_caught: Callable[[int], bool] | None = None,
                 remove_gateways: bool = True, firewall: FirewallSync | None = None) -> None:
        self.config = config
        self.bus = bus
        self.policy = policy
        self.cgroup = cgroup
        self.spawner = make_spawner(self.service_exited)
        self.paths = Paths(config.state_dir, config.run_dir)
        self.firewall = firewall  # None: no nftables tables (docs/firewall.md)
        self._fw_lock = asyncio.Lock()
        self.dirs = CellDirs()
        self.ctx = Context(cgroup, net, self.spawner, self.paths, self.dirs, firewall)
        self.ledger = Ledger(Budget.new(capacity, reserve_amount(config)))
        vmax = min(config.vlan_max, config.vlan_min + config.subnet_count - 1)
        self.pool = AddrPool(PoolConfig.make(str(config.address_pool), 24, config.vlan_min,
                                             vmax))
        self.pressure = pressure
        self.fs_root = fs_root
        self.clock = clock
        self.grace_ms = stop_grace_ms
        self.sigterm_caught = sigterm_caught or default_sigterm_caught
        self.cells: dict[str, CellEntry] = {}
        self.remove_gateways = remove_gateways
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.journal: LockedJournal | None = None
        self.executor: Executor | None = None
        self.slots = SlotTable(config.uid_slots)  # service -> uid range (agent.core.slots)
        bus.mark_state_change(*_STATE_KINDS)

    # ------------------------------------------------------------------ journal
    def open_journal(self, loop: asyncio.AbstractEventLoop) -> list[Record]:
        self.config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        j = Journal(self.config.state_dir / "agent.journal",
                    max_bytes=max(4096, self.config.journal_max_bytes), snapshot=self._snapshot)
        self.journal = LockedJournal(j)

        def hook(ev: PlanEvent) -> None:
            # stamped here, in the worker, so that a step's time is when it ended, not
            # when the loop got to it (bench/cellbench.py's per-step breakdown reads it)
            bad = ev.kind in ("plan-abort", "op-undo-failed")
            event = BusEvent(self.bus.clock(), ev.target, "master", ev.kind, ev.attrs(),
                             "notice" if bad else "info", mono=self.bus.mono())
            loop.call_soon_threadsafe(self.bus.publish, event)

        self.executor = Executor(self.journal, self.ctx, on_op_applied=hook,
                                 on_op_undone=hook, on_plan_done=hook)
        records = list(self.journal.replay())
        self.slots = SlotTable.from_records(self.config.uid_slots, records)
        return records

    def _snapshot(self) -> list[tuple[str, Mapping[str, Any]]]:
        for _ in range(5):  # a worker thread may change a dict while we copy it
            try:
                cells = list(self.cells.values())
                plans = self.executor.snapshot_records() if self.executor else []
                slots = self.slots.records()
                break
            except RuntimeError:
                continue
        out: list[tuple[str, Mapping[str, Any]]] = [("cell", e.to_record()) for e in cells]
        out += [("lease", lease.to_wire()) for lease in self.pool.leases()]
        return out + slots + plans

    def _record(self, t: str, data: Mapping[str, Any]) -> None:
        assert self.journal is not None
        self.journal.append(t, data, sync=True)

    def keep_pin(self, name: str, pin: Mapping[str, int] | None) -> None:
        """Journal an operator's pin (None: unpinned) with the cell, so that the tuner
        restores it after an agentd restart (agent.daemon.tuner.Tuner.start)."""
        e = self.cells.get(name)
        if e is None:
            return
        old, e.pin = e.pin, None if pin is None else dict(pin)
        try:
            self._record("cell", e.to_record())
        except AgentError:
            e.pin = old  # refused (E_JOURNAL_FULL): the caller changes nothing either
            raise

    # ------------------------------------------------------------------ requests
    def load(self, name: str) -> Manifest:
        check_cell_name(name)
        path = self.config.services_dir / f"{name}.toml"
        if not path.is_file():
            raise NotFoundError("E_NOT_FOUND", f"no service `{name}`: {path} does not exist",
                                f"install its manifest in {self.config.services_dir}")
        m = load_manifest(str(path))
        if m.name != name:
            raise AgentError("E_MANIFEST", f"{path} names the service `{m.name}`, not `{name}`",
                             "the file name must be the service name")
        return m

    def _owned(self, uid: int) -> int:
        return sum(1 for e in self.cells.values() if e.owner == uid)

    def _slot(self, name: str, *, take: bool = False) -> int | None:
        """The user-namespace slot of service ``name``: the one it holds, kept across
        restarts in any order (agent.core.slots); ``take`` journals a new one."""
        if not self.config.userns:
            return None
        table = self.slots if take else self.slots.copy()
        keep = set(self.cells) | set(self._data_usage().images)
        slot, rec = table.assign(name, keep)
        if take and rec is not None:
            self._record(SLOT_RECORD, rec)
        return slot

    def _data_usage(self) -> datavol.StateUsage:
        return self.dirs.data_usage(self.paths.images_dir, self.config.state_dir)

    def _admit_data(self, m: Manifest) -> None:
        """Data dir admission (agent.core.datavol.admit_manifest, docs/data-dirs.md)."""
        if m.data is not None:
            datavol.admit_manifest(m, self.config, self._data_usage(),
                                   {n: e.manifest for n, e in self.cells.items()})

    @property
    def budget(self) -> Budget:
        """What the cells hold now (the ledger owns it; read-only here)."""
        return self.ledger.budget

    def _preview(self, m: Manifest, pressure: HostPressure | None) -> Allocation:
        """Admission and allocation on copies: raises a refusal, changes nothing."""
        self.ledger.preview(Request.from_manifest(m), pressure)
        pool = AddrPool.restore(self.pool.config, self.pool.snapshot())
        lease = None
        if m.network is not None:
            vlan = None if m.network.vlan == "auto" else m.network.vlan
            lease = pool.allocate(m.name, vlan)
        self._admit_data(m)
        slot = self._slot(m.name)
        base = self.config.uid_range(slot)[0] if slot is not None else None
        return Allocation.from_lease(lease, base)

    def _journal_room(self, m: Manifest, alloc: Allocation) -> None:
        """E_JOURNAL_FULL unless the journal has room for one more cell: its record and
        lease, and a plan in flight (records the size of its create plan's) for it and for
        each cell there is, which may all be stopped at once (docs/journal.md)."""
        if self.journal is None:
            return
        plan = plan_create(m, alloc, self.config, peers=self._fw_peers(m.name)).to_wire()
        each = (len(encode_record("cell", 0, 0.0, {"manifest": m.to_dict()})) + 512
                + len(encode_record("plan-begin", 0, 0.0, plan)) + 128 * len(plan["ops"]))
        n = len(self.cells)
        self.journal.check_room(each * (n + 1), f"cell {m.name} and a plan in flight for "
                                f"each of the {n + 1} cells")

    def _refused(self, name: str, exc: AgentError) -> AgentError:
        self.bus.emit("lifecycle", "refused", cell=name, severity="notice", code=exc.code,
                      error=exc.message)
        return exc

    async def run(self, name: str, uid: int, gid: int, *, dry_run: bool = False
                  ) -> dict[str, Any]:
        m = self.load(name)
        try:
            self.policy.authorize(uid, gid, "run", name, m, self._owned(uid),
                                  userns=self.config.userns)
            check_image(m, self.fs_root)
            if dry_run:
                alloc = self._preview(m, self.pressure())
                return {"name": name, "dry_run": True,
                        "plan": plan_create(m, alloc, self.config,
                                            peers=self._fw_peers(name)).explain()}
        except AgentError as exc:
            raise self._refused(name, exc) from None
        async with self._lock(name):
            old = self.cells.get(name)
            if old is not None and old.state in LEAVING:
                # On its way out (a stop, or adoption after a power cut destroying a cell
                # whose processes are gone): the boot's S60agent-cells asks for it again
                # right then, and must get it, not E_EXISTS for a cell about to vanish.
                await self._wait(old, lambda c: c.state in (State.DESTROYED, State.FAILED))
                old = self.cells.get(name)
            if old is not None:
                raise StateError("E_EXISTS", f"cell {name} exists ({old.state.value})",
                                 f"agentctl stop {name} first")
            self._drop_orphan_lease(name)
            lease = None
            try:
                pressure = self.pressure()
                alloc = self._preview(m, pressure)
                self._journal_room(m, alloc)
                if m.network is not None:
                    lease = self.pool.allocate(name, alloc.vlan)
                    assert str(lease.address) == alloc.address
                    try:  # journaled before anything else is held: a refusal undoes one thing
                        self._record("lease", lease.to_wire())
                    except AgentError:
                        self.pool.release(name)
                        raise
            except AgentError as exc:
                raise self._refused(name, exc) from None
            self.ledger.admit(Request.from_manifest(m), pressure)  # as previewed: it fits
            slot = self._slot(name, take=True)
            assert alloc.uid_base == (None if slot is None else self.config.uid_range(slot)[0])
            pol = CellPolicy.from_manifest(m, **({} if self.grace_ms is None
                                                 else {"stop_grace_ms": self.grace_ms}))
            e = CellEntry(m, Cell.new(name, pol, self.clock()), alloc, slot, owner=uid)
            self.cells[name] = e
            self.post(e, Event.ADMIT)
            await self._wait(e, lambda c: c.state not in IN_FLIGHT)
            if e.state is State.FAILED or e.state is State.DESTROYED:
                raise e.last_error or StateError("E_STATE", f"cell {name} {e.state.value}")
            return e.summary()

    def _drop_orphan_lease(self, name: str) -> None:
        """No cell ``name`` exists (its lock is held), so no lease may: one left would
        refuse every later run of the name (E_POOL_DUPLICATE).  Seen once in the SIGKILL
        soak on a loaded box, cause not found yet: freed, journaled, and said (alert)."""
        held = self.pool.lease(name)
        if held is None:
            return
        log.error("cell %s: a lease no cell holds (%s on VLAN %d): freed", name,
                  held.address, held.vlan)
        self.pool.release(name)
        try:
            self._record("lease-free", {"cell": name})
        except AgentError as exc:
            log.error("cell %s: freed lease not journaled: %s", name, exc)
        self.bus.emit("master", "lease-dropped", cell=name, severity="alert",
                      address=str(held.address), vlan=held.vlan, why="no cell held it")

    async def stop(self, name: str, uid: int, gid: int) -> dict[str, Any]:
        check_cell_name(name)
        self.policy.authorize(uid, gid, "stop", name, None, self._owned(uid))
        self.entry(name)  # E_NOT_FOUND before a lock is made for the name: one per name kept
        async with self._lock(name):
            e = self.entry(name)
            asked = e.cell  # a FAILED cell is stopped again: wait for the outcome of this stop
            self.post(e, Event.STOP_REQUESTED)
            await self._wait(e, lambda c: c.state is State.DESTROYED
                             or (c.state is State.FAILED and c is not asked))
            if e.state is State.FAILED:
                raise e.last_error or StateError("E_STATE", f"cell {name}: {e.cell.error}")
            return {"name": name, "state": e.state.value}

    def entry(self, name: str) -> CellEntry:
        e = self.cells.get(name)
        if e is None:
            raise NotFoundError("E_NOT_FOUND", f"no cell `{name}`", "agentctl ps lists them")
        return e

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def cell_lock(self, cell: str) -> asyncio.Lock:
        """The lock ``run`` and ``stop`` of ``cell`` hold (the reclaim loop collects an
        orphan of that name under it)."""
        return self._lock(cell)

    async def _wait(self, e: CellEntry, pred: Callable[[Cell], bool]) -> None:
        if pred(e.cell):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        e.drive.waiters.append((pred, fut))
        await fut

    def service_exited(self, cell: str, pid: int, ex: Exit) -> None:
        """The spawner saw pid 1 of ``cell`` end (loop thread)."""
        e = self.cells.get(cell)
        if e is not None:
            self.post(e, ex, pid=pid)

    async def close(self) -> None:
        """agentd stops: cells keep running (the next agentd adopts them)."""
        for e in self.cells.values():
            cancel_timer(e.drive.restart_timer)
            cancel_timer(e.drive.kill_timer)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.spawner.close()
        if self.journal is not None:
            with self.journal.lock:
                try:
                    self.journal.journal.close()
                except AgentError as exc:  # buffered records only (the tuner's): not kept
                    log.error("journal not flushed at shutdown: %s", exc)

