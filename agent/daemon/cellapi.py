"""The cell manager's control ops: run, stop, ps, inspect, logs, and two status fields.

:class:`CellOps` holds the manager that :mod:`agent.daemon.main` builds at start
(before the socket serves); when it cannot be built (no usable cgroups, not root)
agentd still serves and these ops answer ``E_UNAVAILABLE`` with the reason.
:meth:`CellOps.handlers` and :meth:`CellOps.status_fields` are what main registers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.core import seccomp
from agent.core.cell import State
from agent.core.errors import AgentError, RefusedError
from agent.core.logbuf import Stream
from agent.core.planner import cgroup_limits, filter_spec
from agent.core.protocol import Handler, Peer, arg, check_args
from agent.daemon.cells import CellEntry
from agent.daemon.manager import CellManager
from agent.monitor.proc.adapter import ProcReader
from agent.monitor.proc.rules import tree_order

__all__ = ["TREE_LIMIT", "CellOps", "inspect_cell", "process_tree", "ps_row"]

log = logging.getLogger(__name__)
_STREAMS: dict[str, Stream] = {"stdout": "stdout", "stderr": "stderr"}
TREE_LIMIT = 256  # processes listed by ``ps --tree`` (the reply stays within one frame)


def ps_row(mgr: CellManager, e: CellEntry) -> dict[str, Any]:
    """One ``ps`` entry; ``cpu_pct`` is the cgroup's usage since the previous ``ps`` (or
    since the service started), in percent of one CPU."""
    now = time.monotonic()
    row: dict[str, Any] = {
        "name": e.name, "state": e.state.value, "vlan": e.alloc.vlan,
        "address": e.alloc.address.split("/")[0] if e.alloc.address else None,
        "pid": e.pid, "cpu_pct": None, "memory_current": None,
        "memory_max": e.manifest.resources.memory_max, "pids": None,
        "uptime_s": (round(mgr.clock() - e.cell.started_at, 1)
                     if e.state is State.RUNNING and e.cell.started_at else None),
        "restarts": e.cell.restarts, "alerts": e.alerts}
    try:
        st = mgr.cgroup.stats(e.name)
    except (AgentError, OSError):
        return row
    prev = e.cpu_sample
    if prev is None and e.cell.started_at is not None:
        prev = (0, now - max(0.001, mgr.clock() - e.cell.started_at))
    if prev is not None and now > prev[1]:
        row["cpu_pct"] = round((st.cpu_usage_usec - prev[0]) / 1e4 / (now - prev[1]), 1)
    e.cpu_sample = (st.cpu_usage_usec, now)
    row.update(memory_current=st.memory_current, pids=st.pids_current)
    return row


def process_tree(mgr: CellManager, name: str, limit: int = TREE_LIMIT) -> dict[str, Any]:
    """``ps --tree NAME``: the cell's processes depth first (blocking reads of ``/proc``:
    a worker thread).  The processes are those the cell's cgroup holds (one read: every
    process, also those started before this agentd); each row is read from ``/proc``
    (agent.monitor.proc.adapter), pids and uids as the cell sees them (``hpid``: on the
    host).  A process that exited meanwhile is left out."""
    e = mgr.entry(name)
    try:
        hpids = mgr.cgroup.procs(name)
    except (AgentError, OSError):
        hpids = []  # not created yet, or gone: no processes
    rows, more = ProcReader(mgr.cgroup.pid_to_cell).tree_rows(hpids, limit)
    return {"name": name, "state": e.state.value, "procs": tree_order(rows),
            "truncated": more}


def inspect_cell(mgr: CellManager, e: CellEntry) -> dict[str, Any]:
    m = e.manifest
    leaf = mgr.cgroup.leaf(e.name)
    return {
        "name": e.name, "state": e.state.value, "pid": e.pid, "record": e.cell.to_wire(),
        "manifest": m.to_dict(), "allocation": dataclasses.asdict(e.alloc),
        "plan": e.plan_lines, "cgroup": str(leaf),
        "limits": dataclasses.asdict(cgroup_limits(m)),
        "seccomp": [list(r) for r in seccomp.describe(filter_spec(m))],
        "error": e.cell.error,
        "events": [ev.to_wire() for ev in mgr.bus.recent(15, cell=e.name)],
    }


class CellOps:
    """Control-socket handlers over the manager (None until built, or if it failed)."""

    def __init__(self) -> None:
        self.manager: CellManager | None = None
        self.problem = "the cell manager is starting"

    def _mgr(self) -> CellManager:
        if self.manager is None:
            raise AgentError("E_UNAVAILABLE", f"cells are unavailable: {self.problem}",
                             "see the agentd log; `agentctl checkconfig` checks the kernel")
        return self.manager

    async def op_run(self, peer: Peer, args: Mapping[str, Any]) -> dict[str, Any]:
        check_args(args, ("name", "dry_run"))
        name = arg(args, "name", str, required=True)
        dry = arg(args, "dry_run", bool, False)
        assert name is not None
        return await self._mgr().run(name, peer.uid, peer.gid, dry_run=bool(dry))

    async def op_stop(self, peer: Peer, args: Mapping[str, Any]) -> dict[str, Any]:
        check_args(args, ("name",))
        name = arg(args, "name", str, required=True)
        assert name is not None
        return await self._mgr().stop(name, peer.uid, peer.gid)

    async def op_ps(self, peer: Peer, args: Mapping[str, Any]) -> Any:
        """Every cell, one row each; or with ``tree``, that cell's process tree."""
        check_args(args, ("tree",))
        tree = arg(args, "tree", str)
        mgr = self._mgr()
        d = mgr.policy.authorize(peer.uid, peer.gid, "ps", None, None, 0)
        if tree is not None:
            if not d.may_see(tree):
                raise RefusedError("E_POLICY_SERVICE", f"service {tree!r} is not one of "
                                   f"role {d.role.name}'s", "agentctl ps lists yours")
            return await asyncio.to_thread(process_tree, mgr, tree)
        return [ps_row(mgr, e) for name, e in sorted(mgr.cells.items()) if d.may_see(name)]

    def _cell(self, peer: Peer, op: str, args: Mapping[str, Any]) -> tuple[CellManager, str]:
        name = arg(args, "name", str, required=True)
        assert name is not None
        mgr = self._mgr()
        mgr.policy.authorize(peer.uid, peer.gid, op, name, None, 0)
        return mgr, name

    async def op_inspect(self, peer: Peer, args: Mapping[str, Any]) -> dict[str, Any]:
        check_args(args, ("name",))
        mgr, name = self._cell(peer, "inspect", args)
        return inspect_cell(mgr, mgr.entry(name))

    async def op_logs(self, peer: Peer, args: Mapping[str, Any]) -> dict[str, Any]:
        check_args(args, ("name", "n", "stream", "raw"))
        mgr, name = self._cell(peer, "logs", args)
        n = arg(args, "n", int, 50)
        raw = arg(args, "raw", bool, False) is True
        stream = arg(args, "stream", str)
        if n is None or n < 0 or n > 10_000:
            raise AgentError("E_ARGS", "argument `n` must be 0..10000")
        which = None if stream is None else _STREAMS.get(stream)
        if stream is not None and which is None:
            raise AgentError("E_ARGS", f"unknown stream `{stream}`", "stdout or stderr")
        buf = mgr.spawner.logs(name)
        if buf is None:
            if name not in mgr.cells:
                mgr.entry(name)  # E_NOT_FOUND
            return {"name": name, "lines": [], "dropped": 0}
        lines = buf.tail(n, which)
        out = [x.to_wire(raw) for x in lines]
        size = sum(len(x["line"]) + len(x.get("raw", b"")) + 40 for x in out)
        while out and size > 56 * 1024:  # keep the reply within one frame
            x = out.pop(0)
            size -= len(x["line"]) + len(x.get("raw", b"")) + 40
        return {"name": name, "lines": out, "dropped": buf.dropped}

    def status_cells(self) -> int:
        return 0 if self.manager is None else len(self.manager.cells)

    def status_budget(self) -> Any:
        if self.manager is None:
            return f"cells unavailable: {self.problem}"
        b = self.manager.budget

        def amt(a: Any) -> dict[str, int]:
            return {"cpu_m": a.cpu, "memory": a.memory, "pids": a.pids}

        states: dict[str, int] = {}
        for e in self.manager.cells.values():
            states[e.state.value] = states.get(e.state.value, 0) + 1
        return {"capacity": amt(b.capacity), "reserve": amt(b.reserve),
                "committed": amt(b.committed), "free": amt(b.free), "states": states,
                "leases": len(self.manager.pool.leases())}

    def handlers(self) -> dict[str, Handler]:
        return {"run": self.op_run, "stop": self.op_stop, "ps": self.op_ps,
                "inspect": self.op_inspect, "logs": self.op_logs}

    def status_journal(self) -> Any:
        """The journal's size, bound and flash-wear and health counters (docs/journal.md)."""
        j = None if self.manager is None or self.manager.journal is None \
            else self.manager.journal.journal
        if j is None:
            return None
        return {"path": str(j.path), "size": j.size, "max_bytes": j.max_bytes,
                **j.stats.to_wire()}

    def status_fields(self) -> dict[str, Callable[[], Any]]:
        return {"cells": self.status_cells, "budget": self.status_budget,
                "journal": self.status_journal, "firewall": self.status_firewall}

    def status_firewall(self) -> dict[str, int] | None:
        fw = None if self.manager is None else self.manager.firewall
        return None if fw is None else fw.status()

    async def close(self) -> None:
        if self.manager is not None:
            await self.manager.close()
