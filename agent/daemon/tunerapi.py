"""The tuner's and the reclaim loop's control ops: ``pin``, ``unpin`` and ``top``.

:mod:`agent.daemon.main` builds the :class:`~agent.daemon.tuner.Tuner` and the
:class:`~agent.daemon.reclaim.Reclaimer` once the cell manager is up, and hands them to
:class:`TunerOps`; until then (or without a manager) these ops answer
``E_UNAVAILABLE`` with the reason.  The cell manager is seen through
:class:`~agent.daemon.cells.CellDirectory`.  Settings: :mod:`agent.core.settings`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from agent.core.cgroup import CellStats
from agent.core.errors import AgentError
from agent.core.protocol import Handler, Peer, arg, check_args
from agent.core.units import UnitError, parse_cpu, parse_size
from agent.daemon.cells import CellDirectory, Tuned
from agent.daemon.reclaim import Reclaimer
from agent.daemon.tuner import Tuner

__all__ = ["TunerOps", "top_row", "tuned_row"]

log = logging.getLogger(__name__)


def tuned_row(t: Tuned | None, level: str) -> dict[str, Any]:
    """What ``agentctl top`` shows of a cell's tuning (beside fresh stats); ``level``: its
    escalation by the reclaim loop."""
    if t is None:
        return {"tuned": False}
    s = t.state.size
    return {"tuned": True, "cpu_max": s.cpu, "memory_high": s.memory_high,
            "memory_max": s.memory_max, "pinned": t.state.pinned, "level": level,
            "held": t.state.held.to_wire(), "sources": list(t.sources),
            "sampled_every_s": None if t.due is None else t.interval}


def top_row(mgr: CellDirectory, tuner: Tuner | None, name: str, now: float) -> dict[str, Any]:
    """One ``top`` row: fresh stats, the tuner's limits; CPU % over the time since the
    latest reading of the cell (the last ps/top row or the tuner's last sample)."""
    e = mgr.cells[name]
    row: dict[str, Any] = {"name": name, "state": e.state.value, "cpu_pct": None,
                           "memory_current": None, "pids": None, "cpu_pressure": None,
                           "memory_pressure": None}
    t = tuner.cells.get(name) if tuner is not None else None
    row.update(tuned_row(t, e.rung.level))
    try:
        st: CellStats = mgr.cgroup.stats(name)
    except (AgentError, OSError):
        return row
    row.update(memory_current=st.memory_current, pids=st.pids_current)
    for res in ("cpu", "memory"):
        p = st.pressure.get(res)
        row[f"{res}_pressure"] = p.some.avg10 if p is not None else None
    # CPU % since the latest reading: this cell's last ps/top row or the tuner's last sample
    # (a quiet cell is not sampled: without the former, a long average would show).
    smp = t.state.last_sample if t is not None else None
    seen = [p for p in (e.cpu_sample, (smp.cpu_usage_usec, smp.at) if smp else None)
            if p is not None and now > p[1] and st.cpu_usage_usec >= p[0]]
    if seen:
        usage, at = max(seen, key=lambda p: p[1])
        row["cpu_pct"] = round((st.cpu_usage_usec - usage) / 1e4 / (now - at), 1)
    e.cpu_sample = (st.cpu_usage_usec, now)
    return row


class TunerOps:
    """Control-socket handlers over the tuner, the reclaim loop and the cells they tune."""

    def __init__(self) -> None:
        self.cells: CellDirectory | None = None
        self.tuner: Tuner | None = None
        self.reclaimer: Reclaimer | None = None
        self.problem = "the tuner is starting"

    def handlers(self) -> dict[str, Handler]:
        return {"pin": self.op_pin, "unpin": self.op_unpin, "top": self.op_top}

    async def close(self) -> None:
        if self.reclaimer is not None:
            await self.reclaimer.close()
        if self.tuner is not None:
            self.tuner.close()

    def _tuner(self) -> tuple[CellDirectory, Tuner]:
        if self.cells is None or self.tuner is None:
            raise AgentError("E_UNAVAILABLE", f"the tuner is unavailable: {self.problem}",
                             "see the agentd log")
        return self.cells, self.tuner

    def _named(self, peer: Peer, args: Mapping[str, Any]) -> tuple[Tuner, str]:
        mgr, tuner = self._tuner()
        name = arg(args, "name", str, required=True)
        assert name is not None
        mgr.policy.authorize(peer.uid, peer.gid, "resize", name, None, 0)
        mgr.entry(name)  # E_NOT_FOUND
        return tuner, name

    async def op_pin(self, peer: Peer, args: Mapping[str, Any]) -> dict[str, Any]:
        check_args(args, ("name", "cpu", "memory"))
        tuner, name = self._named(peer, args)
        try:
            cpu = None if args.get("cpu") is None else parse_cpu(args["cpu"])
            mem = None if args.get("memory") is None else parse_size(args["memory"])
        except UnitError as exc:
            raise AgentError("E_ARGS", str(exc)) from None
        size = tuner.pin(name, cpu, mem)
        return {"name": name, "pinned": True, "cpu_max": size.cpu,
                "memory_high": size.memory_high, "memory_max": size.memory_max}

    async def op_unpin(self, peer: Peer, args: Mapping[str, Any]) -> dict[str, Any]:
        check_args(args, ("name",))
        tuner, name = self._named(peer, args)
        tuner.unpin(name)
        return {"name": name, "pinned": False}

    async def op_top(self, peer: Peer, args: Mapping[str, Any]) -> dict[str, Any]:
        check_args(args, ())
        mgr, tuner = self._tuner()
        d = mgr.policy.authorize(peer.uid, peer.gid, "ps", None, None, 0)
        now = time.monotonic()
        rows = [top_row(mgr, tuner, n, now) for n in sorted(mgr.cells) if d.may_see(n)]
        b = mgr.ledger.budget
        return {"cells": rows, "budget_free": {"cpu": b.free.cpu, "memory": b.free.memory},
                "box_memory_pressure": self.reclaimer.box_pressure() if self.reclaimer
                else None}
