"""``agentd``: the entry point, and the one place that builds everything.

:func:`main` parses the command line, takes the instance lock (one agentd per state
dir, before anything reads or writes state) and runs the :class:`~agent.daemon.server.Daemon`.
:func:`wire_cells` builds the services on it and passes each what it needs; no service
imports another (docs/architecture.md); the security channels are built by
:mod:`agent.daemon.monitors`:

* at start, before the socket serves: the cell manager (:func:`build_manager`: cgroup
  backend, host network, policy, firewall, spawner, journal replay and adoption), then
  the tuner and the reclaim loop over it (:func:`start_tuning`), and channel 1's exec
  monitor (:func:`wire_exec`: its spawn hook and its groups passed across a respawn);
* after it, channel 2's process and host monitors (:func:`wire_watchers`);
* the op handlers of each (:class:`~agent.daemon.cellapi.CellOps`,
  :class:`~agent.daemon.tunerapi.TunerOps`) and their status fields;
* at shutdown, in reverse: the tuner and reclaim loop, then the manager (cells keep
  running; the next agentd adopts them).

When the manager cannot be built (no usable cgroups, not root) agentd still serves and
the cell ops answer ``E_UNAVAILABLE`` with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import agent
from agent import __version__
from agent.core.args import parse
from agent.core.cell import State
from agent.core.cellctx import Paths
from agent.core.config import DEFAULT_CONFIG_PATH, LOG_LEVELS, AgentConfig, load_config
from agent.core.errors import AgentError, ConfigError
from agent.core.policy import Policy, load_policy
from agent.core.protocol import Peer
from agent.core.sandbox import SpawnSpec
from agent.core.settings import Settings, load_settings
from agent.daemon.bus import EventBus
from agent.daemon.cellapi import CellOps
from agent.daemon.cells import ExitCallback
from agent.daemon.gcstats import GcPauses, freeze_now
from agent.daemon.history import EventHistory
from agent.daemon.manager import CellManager
from agent.daemon.monitors import (
    AGENT_SEAL,
    closer,
    hook_master_attack,
    wire_correlation,
    wire_exec,
    wire_integrity,
    wire_signals,
    wire_syscalls,
    wire_watchers,
)
from agent.daemon.reclaim import Reclaimer
from agent.daemon.respawn import Respawner
from agent.daemon.responder import Responder
from agent.daemon.server import Daemon
from agent.daemon.spawner import CellLimits, CellSpawner, ListenerCallback
from agent.daemon.tuner import Tuner
from agent.daemon.tunerapi import TunerOps
from agent.kernel import inherit
from agent.kernel.cgroupdetect import open_backend
from agent.kernel.cgroupv2 import CgroupV2
from agent.kernel.eventlog import EventLog
from agent.kernel.host import read_capacity, read_host_pressure
from agent.kernel.lock import InstanceLock
from agent.kernel.net import HostNet
from agent.kernel.nft import FirewallSync, Nft
from agent.kernel.orphans import KernelObjects
from agent.kernel.ports import set_cell_port
from agent.kernel.spawn import Spawned, spawn_cell
from agent.monitor.correlation.settings import parse_settings as parse_correlation_settings
from agent.monitor.exec.service import ExecService
from agent.monitor.net.service import ManagerCells, NetMonitor

__all__ = ["build_manager", "hook_master_attack", "main", "setup_logging", "start_tuning",
           "wire_cells", "wire_correlation", "wire_exec", "wire_integrity", "wire_signals",
           "wire_syscalls", "wire_watchers"]

log = logging.getLogger("agentd")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentd", description="agentd: the cell isolation agent.")
    p.add_argument("--version", action="version", version=f"agentd {__version__}")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, metavar="PATH",
                   help=f"configuration file (default {DEFAULT_CONFIG_PATH}; missing = defaults)")
    p.add_argument("--socket", type=Path, metavar="PATH", help="control socket path override")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="state directory override")
    p.add_argument("--pidfile", type=Path, metavar="PATH",
                   help="pid file (default <run_dir>/agentd.pid)")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="override the configured log level")
    p.add_argument("--no-cells", action="store_true",
                   help="serve the control socket without the cell manager (diagnostics)")
    p.add_argument("--check", action="store_true",
                   help="validate the configuration, print it as JSON and exit")
    return p


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s.%(msecs)03d agentd[%(process)d] %(levelname).1s %(name)s: %(message)s",
        "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse(_parser(), argv)
    if isinstance(ns, int):
        return ns
    try:
        config = load_config(ns.config, missing_ok=True)
        overrides: dict[str, Any] = {}
        if ns.socket is not None:
            overrides["socket_path"] = ns.socket.absolute()
        if ns.state_dir is not None:
            overrides["state_dir"] = ns.state_dir.absolute()
        if ns.log_level is not None:
            overrides["log_level"] = ns.log_level
        config = replace(config, **overrides)
        # [correlation] is kept as written by the config parser (channel 4 owns its
        # keys): checked here too, so that --check and a start refuse the same typo.
        parse_correlation_settings(config.correlation, config.state_dir)
    except AgentError as exc:
        print(f"agentd: {exc.to_wire()['message']}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2
    if ns.check:
        print(json.dumps(config.to_wire(), indent=2))
        return 0
    setup_logging(config.log_level)
    # The lock first: nothing (journal, socket, pid file, start-up hooks) before it.
    # --no-cells takes it too: it serves the same socket and writes the same pid file.
    # A respawned master (or an upgraded one) inherits the lock and its descriptors.
    inherited = inherit.take()
    lock = InstanceLock(config.state_dir)
    try:
        fd = inherited.claim("lock")
        if fd is not None:
            lock.adopt(fd)
            log.warning("respawned: inherited %s", ", ".join(["lock", *inherited.names()]))
        else:
            lock.acquire()
    except AgentError as exc:
        log.error("%s", exc)
        return 1
    try:
        daemon = Daemon(config, pidfile=ns.pidfile.absolute() if ns.pidfile else None,
                        inherited=inherited)
        wire_signals(daemon)  # before any thread: the mask is inherited by threads
        pauses = GcPauses()
        pauses.install()
        daemon.add_status("gc", pauses.status)
        history = wire_history(daemon)
        correlation = wire_correlation(daemon, daemon.config.correlation)
        execmon = None if ns.no_cells else wire_exec(daemon)
        cells = None if ns.no_cells else wire_cells(daemon, execmon)[0]
        if cells is not None:
            wire_watchers(daemon, cells)
        respawner = wire_respawn(daemon, lock, history, cells,
                                 list(sys.argv[1:] if argv is None else argv))
        if execmon is not None:  # its groups survive a respawn; what it read is answered
            respawner.keep(execmon.kept)
            respawner.flush.insert(0, execmon.flush)
        hook_master_attack(correlation, respawner)
        wire_integrity(daemon, respawner)
        daemon.on_startup(after_start)  # last: what is alive now stays
        asyncio.run(daemon.run())
    except AgentError as exc:
        log.error("%s", exc)
        return 1
    finally:
        lock.release()
    return 0


async def after_start() -> None:
    """Everything is in place (modules, cells adopted, the library): out of the cyclic
    collector's passes (agent.daemon.gcstats)."""
    freeze_now()


def wire_history(daemon: Daemon) -> EventHistory:
    """The persistent event log on the bus (alerts and state changes, bounded for flash),
    its ``events.log`` op and the bus's status field."""
    history = EventHistory(daemon.bus, EventLog(daemon.config.state_dir / "events.log"))
    for op, handler in history.handlers().items():
        daemon.register(op, handler)
    daemon.add_status("event_bus", history.status)

    async def shutdown() -> None:
        history.close()

    daemon.on_shutdown(shutdown)
    return history


def wire_respawn(daemon: Daemon, lock: InstanceLock, history: EventHistory,
                 cells: CellOps | None, argv: list[str]) -> Respawner:
    """The master's respawn (``agentctl respawn``, and the hook the correlation engine's
    patterns tagged ``master`` call): what it keeps across exec and what it flushes."""
    def authorize(peer: Peer) -> None:
        policy = cells.manager.policy if cells is not None and cells.manager is not None \
            else load_policy(str(daemon.config.policy_path))
        policy.authorize(peer.uid, peer.gid, "respawn", None, None, 0)

    def kept() -> dict[str, int]:
        out = {"lock": lock.fileno(), "control": daemon.server.fileno()}
        return {k: v for k, v in out.items() if v is not None}

    respawner = Respawner(daemon.bus, argv, package_root=Path(agent.__file__).parents[1],
                          seal_path=AGENT_SEAL, policy_check=authorize,
                          flush=[daemon.bus.close, history.log.close])
    respawner.keep(kept)
    for op, handler in respawner.handlers().items():
        daemon.register(op, handler)

    async def unclaimed() -> None:
        left = daemon.inherited.close_unclaimed()
        if left:
            log.warning("respawned: inherited descriptors nobody took, closed: %s",
                        ", ".join(left))

    daemon.on_startup(unclaimed)
    return respawner


def wire_cells(daemon: Daemon, execmon: ExecService | None = None
               ) -> tuple[CellOps, TunerOps]:
    """Register the cell services on ``daemon``: built at start, closed at shutdown."""
    cells, tuning = CellOps(), TunerOps()
    channel2 = wire_syscalls(daemon, cells)  # first: its start-up takes back the listeners
    # channel 3: flow, refusal, layer-2 and scan events (docs/channel3.md)
    netmon = NetMonitor(daemon.bus, daemon.config.address_pool)

    async def startup() -> None:
        try:
            cells.manager = await build_manager(daemon.config, daemon.bus, execmon,
                                                on_listener=channel2.on_listener)
        except (AgentError, OSError) as exc:
            cells.problem = str(exc)
            tuning.problem = f"no cell manager: {exc}"
            log.error("cell manager not started: %s", exc)
            return
        mgr = cells.manager
        running = sum(1 for e in mgr.cells.values() if e.state is State.RUNNING)
        log.info("cell manager ready: %d cells from the journal (%d running)",
                 len(mgr.cells), running)
        start_tuning(daemon.config, mgr, tuning)
        if execmon is not None:
            await execmon.start()
        responder = Responder(mgr.bus, mgr, mgr.cgroup, daemon.config.responses,
                              isolate=set_cell_port)
        responder.attach()
        daemon.add_status("responses", responder.status)
        daemon.on_shutdown(closer(responder.close))
        netmon.start(asyncio.get_running_loop(), ManagerCells(mgr, mgr.ctx.net.netns_path),
                     mgr.firewall)

    daemon.on_startup(startup)
    daemon.on_shutdown(cells.close)
    daemon.on_shutdown(netmon.aclose)
    daemon.add_status("net_monitor", netmon.status)
    daemon.on_shutdown(tuning.close)  # shutdown hooks run in reverse: tuning goes first
    for op, handler in {**cells.handlers(), **tuning.handlers()}.items():
        daemon.register(op, handler)
    for key, fn in cells.status_fields().items():
        daemon.add_status(key, fn)
    return cells, tuning


def start_tuning(config: AgentConfig, mgr: CellManager, tuning: TunerOps) -> None:
    """The tuner and the reclaim loop over the manager's cells, with the settings of
    ``tuner.toml`` beside the policy (defaults, and an event, when it is invalid)."""
    path = config.policy_path.parent / "tuner.toml"
    try:
        s = load_settings(path)
    except ConfigError as exc:
        log.error("%s; the tuner uses its defaults", exc)
        mgr.bus.emit("tuner", "error", severity="notice", error=str(exc))
        s = Settings()
    loop = asyncio.get_running_loop()
    tuner = Tuner(mgr, mgr.cgroup, loop, config=s.tuner, sample_s=s.sample_s,
                  sample_max_s=s.sample_max_s, stall_us=s.stall_us, window_us=s.window_us)
    tuner.attach()
    objects = KernelObjects(mgr.cgroup, config.bridge, run_dir=config.run_dir)
    reclaimer = Reclaimer(mgr, tuner, mgr.cgroup, loop, objects, s.reclaim, s.period_s,
                          s.scan_s)
    reclaimer.start()
    tuning.cells, tuning.tuner, tuning.reclaimer = mgr, tuner, reclaimer
    log.info("tuner: %d cells tuned; samples every %gs (up to %gs, none for settled cells); "
             "reclaim passes on events%s", len(tuner.cells), s.sample_s, tuner.sample_max_s,
             f" and every {s.period_s:g}s (no box PSI)" if reclaimer.polled else "")


async def build_manager(config: AgentConfig, bus: EventBus,
                        execmon: ExecService | None = None,
                        on_listener: ListenerCallback | None = None) -> CellManager:
    """The real thing: cgroup v2 subtree (agentd moved to ``agent-master``), the bridge,
    the policy, capacity and PSI readers, the spawner (through the exec monitor's spawn
    hook when there is one); then journal replay and adoption."""
    loop = asyncio.get_running_loop()
    cg = open_backend(config.cgroup_root)  # v2, or v1 on legacy BSP kernels
    if isinstance(cg, CgroupV2):
        cg.master = "agent-master"
    await asyncio.to_thread(cg.setup)
    hostnet = HostNet(config.bridge)
    await asyncio.to_thread(hostnet.setup)
    try:
        policy = load_policy(str(config.policy_path))
    except (AgentError, OSError) as exc:
        log.error("policy %s not loaded, every request is refused: %s", config.policy_path, exc)
        policy = Policy(source=str(config.policy_path))
    paths = Paths(config.state_dir, config.run_dir)

    spawn: Callable[[SpawnSpec], Spawned] = spawn_cell if execmon is None else execmon.spawn

    def make_spawner(on_exit: ExitCallback) -> CellSpawner:
        limits = CellLimits(output_rate=config.output_rate, output_burst=config.output_burst)
        return CellSpawner(loop, paths, bus, on_exit, log_bytes=config.log_buffer_bytes,
                           spawn=spawn, limits=limits, on_listener=on_listener)

    # Channels 1 and 3: each cell's own nftables table and the host's forwarding table
    # (docs/firewall.md); a create plan refuses to start a cell unfiltered without it.
    firewall = FirewallSync(Nft(), config.bridge, hostnet.netns_path)
    mgr = CellManager(config, bus, policy, cgroup=cg, net=hostnet, make_spawner=make_spawner,
                      capacity=read_capacity(), pressure=read_host_pressure, firewall=firewall)
    mgr.open_journal(loop)
    if execmon is not None:  # before start: adoption may restart a cell (a spawn)
        execmon.attach(mgr, cg)
    await mgr.start()
    return mgr
