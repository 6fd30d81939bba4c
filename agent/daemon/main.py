"""``agentd``: the entry point, and the one place that builds everything.

:func:`main` parses the command line, takes the instance lock (one agentd per state
dir, before anything reads or writes state) and runs the :class:`~agent.daemon.server.Daemon`.
:func:`wire_cells` builds the services on it and passes each what it needs; no service
imports another (docs/architecture.md):

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
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
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
from agent.core.names import NETNS_PREFIX
from agent.core.policy import Policy, load_policy
from agent.core.protocol import Peer
from agent.core.sandbox import SpawnSpec
from agent.core.settings import Settings, load_settings
from agent.daemon.bus import EventBus
from agent.daemon.cellapi import CellOps
from agent.daemon.cells import ExitCallback
from agent.daemon.history import EventHistory
from agent.daemon.integrity import IntegrityWatch
from agent.daemon.manager import CellManager
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
from agent.kernel.netns import NETNS_DIR
from agent.kernel.nft import FirewallSync, Nft
from agent.kernel.orphans import KernelObjects
from agent.kernel.ports import set_cell_port
from agent.kernel.spawn import Spawned, spawn_cell
from agent.monitor.correlation.service import CorrelationService
from agent.monitor.correlation.service_ops import PatternOps
from agent.monitor.correlation.settings import parse_settings
from agent.monitor.exec.service import INHERIT_PREFIX, ExecService
from agent.monitor.exec.settings import ExecSettings, settings_from_text
from agent.monitor.host.service import HostMonitor
from agent.monitor.net.service import ManagerCells, NetMonitor
from agent.monitor.proc.service import ProcMonitor
from agent.monitor.syscall.adapter_keeper import KeeperLink
from agent.monitor.syscall.service import SyscallService, TrapLimits

__all__ = ["build_manager", "main", "setup_logging", "start_tuning", "wire_cells",
           "wire_correlation", "wire_exec", "wire_syscalls", "wire_watchers"]

# The installed agent's seal, written when the image was built (docs/master.md).
AGENT_SEAL = Path("/usr/share/agent/agent.seal")

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
        history = wire_history(daemon)
        correlation = wire_correlation(daemon)
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
        asyncio.run(daemon.run())
    except AgentError as exc:
        log.error("%s", exc)
        return 1
    finally:
        lock.release()
    return 0


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


def wire_correlation(daemon: Daemon, table: Mapping[str, Any] | None = None
                     ) -> CorrelationService | None:
    """Channel 4: the correlation engine on the bus, its pattern bundles (shipped,
    stored, dropped in the update directory), its ops (``patterns``,
    ``patterns.install``, ``patterns.rollback``) and its status field.  ``table``: the
    ``[correlation]`` settings (docs/patterns.md); its start-up runs before the cell
    manager's, so that the patterns see the manager's first events."""
    settings = parse_settings(table, daemon.config.state_dir)
    if not settings.enabled:
        return None
    svc = CorrelationService(daemon.bus, settings, policy_path=daemon.config.policy_path)
    daemon.on_startup(svc.start)
    daemon.on_shutdown(svc.close)
    for op, handler in PatternOps(svc).handlers().items():
        daemon.register(op, handler)
    daemon.add_status("correlation", svc.status)
    return svc


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


def hook_master_attack(svc: CorrelationService | None, respawner: Respawner) -> None:
    """A match of a pattern tagged ``master`` re-makes the master (design step I): on
    the loop's next turn, once the alert is out; the respawn checks the seal first."""
    if svc is not None:
        svc.on_master_attack = lambda m: respawner.request(
            "pattern", pattern=m.pattern, cells=list(m.cells))


def wire_integrity(daemon: Daemon, respawner: Respawner) -> IntegrityWatch:
    """The installed agent's files watched against their seal: a difference is an
    ``agent/integrity`` alert and a respawn request (refused while the files differ:
    tampered code is never run).  Status field ``integrity``."""
    watch = IntegrityWatch(
        daemon.bus, respawner.package_root / "agent", respawner.seal_path or AGENT_SEAL,
        on_tamper=lambda bad: respawner.request(
            "integrity", files=[f"{m.path} ({m.reason})" for m in bad[:20]]))
    daemon.on_startup(watch.start)
    daemon.on_shutdown(watch.close)
    daemon.add_status("integrity", watch.status)
    return watch


def wire_exec(daemon: Daemon) -> ExecService | None:
    """Channel 1, exec protection (docs/exec.md), with the settings of ``exec.toml``
    beside the policy (defaults, enforcing, and an alert, when it is invalid; None when
    its mode is ``off``).  The groups a previous master passed on are claimed now,
    before anything closes what is unclaimed; the manager attaches it and starts it."""
    path = daemon.config.policy_path.parent / "exec.toml"
    problem = None
    try:
        settings = settings_from_text(path.read_text(), daemon.config.state_dir, str(path))
    except FileNotFoundError:
        settings = settings_from_text("", daemon.config.state_dir)
    except (ConfigError, OSError) as exc:
        problem = str(exc)
        log.error("%s; channel 1 uses its defaults", exc)
        settings = ExecSettings(signatures=daemon.config.state_dir / "exec/signatures.txt")
    if settings.mode == "off":
        log.warning("exec protection is off (%s)", path)
        return None
    inherited = {n: fd for n in daemon.inherited.names(INHERIT_PREFIX)
                 if (fd := daemon.inherited.claim(n)) is not None}
    svc = ExecService(daemon.bus, settings, inherited=inherited)
    daemon.add_status("exec", svc.status)
    daemon.on_shutdown(_closer(svc.close))
    if problem is not None:
        daemon.bus.emit("exec", "settings-refused", severity="alert", path=str(path),
                        error=problem)
    return svc


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
        responder = Responder(mgr.bus, mgr, mgr.cgroup, isolate=set_cell_port)
        responder.attach()
        daemon.add_status("responses", responder.status)
        daemon.on_shutdown(_closer(responder.close))
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


def wire_watchers(daemon: Daemon, cells: CellOps) -> tuple[ProcMonitor, HostMonitor]:
    """Channel 2's process and host halves (agent.monitor.proc, agent.monitor.host,
    docs/host-monitor.md): started after the cell manager (processes are attributed
    through its cgroup backend), closed before it; the ``proc`` and ``host`` status
    fields.  The host monitor watches this agent's run and state dirs and netns pins as
    its own mounts, and its bridge's links as its own links."""
    config = daemon.config

    def cell_of(pid: int) -> str | None:
        mgr = cells.manager
        return None if mgr is None else mgr.cgroup.pid_to_cell(pid)

    procs = ProcMonitor(daemon.bus, cell_of)
    run, state, netns = str(config.run_dir), str(config.state_dir), str(NETNS_DIR)
    host = HostMonitor(daemon.bus, bridge=config.bridge,
                       own_mounts=(run, run + "/", state, state + "/", netns,
                                   netns + "/" + NETNS_PREFIX + "*"))

    async def startup() -> None:
        await host.start()
        if cells.manager is not None:
            await procs.start()

    daemon.on_startup(startup)
    daemon.on_shutdown(procs.close)
    daemon.on_shutdown(host.close)
    daemon.add_status("proc", procs.status)
    daemon.add_status("host", host.status)
    return procs, host


def _closer(fn: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        fn()

    return close


def wire_syscalls(daemon: Daemon, cells: CellOps) -> SyscallService:
    """Channel 2 (agent.monitor.syscall): the service that answers every cell's trapped
    syscalls, the listener keeper that outlives agentd (its socket in the run dir), the
    reboot a cell granted ``reboot`` asks for, and the ``syscall`` status field."""

    def granted(cell: str) -> frozenset[str] | None:
        if cells.manager is None:
            return None  # starting: the trap waits (a while) for the cell's manifest
        e = cells.manager.cells.get(cell)
        return frozenset(e.manifest.privileges.ops) if e is not None else frozenset()

    def reboot(how: str) -> None:  # an orderly shutdown by init, as an operator would
        command = {"restart": "reboot"}.get(how, how)  # poweroff, halt
        log.warning("a cell asked to %s the box; running `%s`", how, command)
        try:
            subprocess.Popen([command], start_new_session=True, stdin=subprocess.DEVNULL)
        except OSError as exc:
            log.error("%s: %s", command, exc)

    keeper = KeeperLink(str(daemon.config.run_dir / "listeners.sock"))
    limits = TrapLimits(rate=daemon.config.trap_rate, burst=daemon.config.trap_burst)
    service = SyscallService(daemon.bus, granted, reboot=reboot, keeper=keeper, limits=limits)
    daemon.on_startup(service.start)
    daemon.on_shutdown(service.close)
    daemon.add_status("syscall", service.status)
    return service


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
