"""The tuner and the reclaim loop in agentd: settings, start-up, and the control ops
``pin``, ``unpin`` and ``top``.

:func:`attach` is called by agent.masterops after the cell manager's own hooks: once
the manager is built, the :class:`~agent.tunerd.Tuner` subscribes to its lifecycle events
and the :class:`~agent.reclaimd.Reclaimer` runs its first pass.  Without a manager these
ops answer ``E_UNAVAILABLE``.

Settings: ``tuner.toml`` beside the policy (``/etc/agent/tuner.toml``), optional::

    [tuner]                     # agent.tuner.TunerConfig fields, plus:
    sample_s = 5.0              # the sample of a cell that can still be lowered ...
    sample_max_s = 60.0         # ... backing off to this while samples change nothing
    stall_us = 150000           # PSI trigger: stalled time ...
    window_us = 1000000         # ... within this window
    [reclaim]                   # agent.reclaim.ReclaimConfig fields, plus:
    period_s = 10.0             # passes while escalated (or always, without box PSI)
    scan_s = 30.0               # orphan scans at most this often (more: grace ending)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agent.core.cgroup import CellStats
from agent.core.errors import AgentError, ConfigError
from agent.core.settings import Settings, load_settings
from agent.core.units import UnitError, parse_cpu, parse_size
from agent.daemon.control import Peer, arg, check_args
from agent.daemon.reclaim import Reclaimer
from agent.daemon.tuner import Tuner
from agent.kernel.orphans import KernelObjects

if TYPE_CHECKING:
    from agent.daemon.cellapi import MasterOps
    from agent.daemon.manager import CellManager
    from agent.daemon.server import Daemon

__all__ = ["TunerOps", "attach", "top_row"]

log = logging.getLogger(__name__)


def top_row(mgr: CellManager, tuner: Tuner | None, name: str, now: float) -> dict[str, Any]:
    """One ``top`` row: fresh stats, the tuner's limits; CPU % over the time since the
    latest reading of the cell (the last ps/top row or the tuner's last sample)."""
    e = mgr.cells[name]
    row: dict[str, Any] = {"name": name, "state": e.state.value, "cpu_pct": None,
                           "memory_current": None, "pids": None, "cpu_pressure": None,
                           "memory_pressure": None}
    t = tuner.cells.get(name) if tuner is not None else None
    row.update(tuner.row(name) if tuner is not None else {"tuned": False})
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
    def __init__(self, daemon: Daemon, ops: MasterOps) -> None:
        self.daemon = daemon
        self.ops = ops
        self.tuner: Tuner | None = None
        self.reclaimer: Reclaimer | None = None
        self.problem = "the tuner is starting"

    async def startup(self) -> None:
        mgr = self.ops.manager
        if mgr is None:
            self.problem = f"no cell manager: {self.ops.problem}"
            return
        path = self.daemon.config.policy_path.parent / "tuner.toml"
        try:
            s = load_settings(path)
        except ConfigError as exc:
            log.error("%s; the tuner uses its defaults", exc)
            self.daemon.bus.emit("tuner", "error", severity="notice", error=str(exc))
            s = Settings()
        loop = asyncio.get_running_loop()
        self.tuner = Tuner(mgr, mgr.cgroup, loop, config=s.tuner,  # type: ignore[arg-type]
                           sample_s=s.sample_s, sample_max_s=s.sample_max_s,
                           stall_us=s.stall_us, window_us=s.window_us)
        self.tuner.attach()
        objects = KernelObjects(mgr.cgroup, self.daemon.config.bridge,  # type: ignore[arg-type]
                                run_dir=self.daemon.config.run_dir)
        self.reclaimer = Reclaimer(mgr, self.tuner, mgr.cgroup, loop,  # type: ignore[arg-type]
                                   objects, s.reclaim, s.period_s, s.scan_s)
        self.reclaimer.start()
        log.info("tuner: %d cells tuned; samples every %gs (up to %gs, none for settled cells); "
                 "reclaim passes on events%s", len(self.tuner.cells), s.sample_s,
                 self.tuner.sample_max_s,
                 f" and every {s.period_s:g}s (no box PSI)" if self.reclaimer.polled else "")

    async def close(self) -> None:
        if self.reclaimer is not None:
            await self.reclaimer.close()
        if self.tuner is not None:
            self.tuner.close()

    def _tuner(self) -> tuple[CellManager, Tuner]:
        mgr = self.ops.manager
        if mgr is None or self.tuner is None:
            raise AgentError("E_UNAVAILABLE", f"the tuner is unavailable: {self.problem}",
                             "see the agentd log")
        return mgr, self.tuner

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
        b = mgr.budget
        return {"cells": rows, "budget_free": {"cpu": b.free.cpu, "memory": b.free.memory},
                "box_memory_pressure": self.reclaimer.box_pressure() if self.reclaimer
                else None}


def attach(daemon: Daemon, ops: MasterOps) -> TunerOps:
    t = TunerOps(daemon, ops)
    daemon.on_startup(t.startup)
    daemon.on_shutdown(t.close)
    daemon.register("pin", t.op_pin)
    daemon.register("unpin", t.op_unpin)
    daemon.register("top", t.op_top)
    return t
