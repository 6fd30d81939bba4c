"""agentd's security channels wired to the loop (the builder's second half, beside
:mod:`agent.daemon.main`): each function builds one channel's service, registers its
start, shutdown, ops and status field on the :class:`~agent.daemon.server.Daemon`, and
returns it for ``main`` to connect to the others (docs/architecture.md):

* channel 1's exec protection (:func:`wire_exec`);
* channel 2: the trapped syscalls (:func:`wire_syscalls`), the process life cycle and
  the host's parameters (:func:`wire_watchers`);
* channel 4: correlation (:func:`wire_correlation`), and the master's own defence
  (:func:`hook_master_attack`, :func:`wire_integrity`).

Channel 3 (:class:`~agent.monitor.net.service.NetMonitor`) starts with the cell manager,
in :func:`agent.daemon.main.wire_cells`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from agent.core.errors import ConfigError, KernelError
from agent.core.names import NETNS_PREFIX
from agent.daemon.cellapi import CellOps
from agent.daemon.gcstats import freeze_now
from agent.daemon.integrity import IntegrityWatch
from agent.daemon.respawn import Respawner
from agent.daemon.server import Daemon
from agent.kernel.netns import NETNS_DIR
from agent.kernel.signalfd import SignalWatch
from agent.monitor.correlation.service import CorrelationService
from agent.monitor.correlation.service_ops import PatternOps
from agent.monitor.correlation.settings import parse_settings
from agent.monitor.exec.service import INHERIT_PREFIX, ExecService
from agent.monitor.exec.settings import ExecSettings, settings_from_text
from agent.monitor.host.service import HostMonitor
from agent.monitor.proc.service import ProcMonitor
from agent.monitor.syscall.adapter_keeper import KeeperLink
from agent.monitor.syscall.service import SyscallService, TrapLimits

__all__ = ["AGENT_SEAL", "closer", "hook_master_attack", "wire_correlation", "wire_exec",
           "wire_integrity", "wire_signals", "wire_syscalls", "wire_watchers"]

# The installed agent's seal, written when the image was built (docs/master.md).
AGENT_SEAL = Path("/usr/share/agent/agent.seal")

log = logging.getLogger("agentd")


def wire_signals(daemon: Daemon) -> SignalWatch | None:
    """The master's own guard against signals it never expects (agent.kernel.signalfd):
    each one is ``agent/signal`` with its sender (an alert unless init sent it: channel
    4's master-signalled pattern) and none of them ends agentd.  Called before any
    thread starts (the mask is per thread, inherited by the threads started after)."""
    try:
        watch = SignalWatch()
    except KernelError as exc:
        log.error("no signal watch (unexpected signals keep their default action): %s", exc)
        return None

    def on_ready() -> None:
        for r in watch.read():
            daemon.bus.emit("agent", "signal", severity="notice" if r.pid == 1 else "alert",
                            sig=r.name, sender_pid=r.pid, uid=r.uid, code=r.code)

    async def start() -> None:
        asyncio.get_running_loop().add_reader(watch.fileno(), on_ready)

    async def close() -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(watch.fileno())
        watch.close()

    daemon.on_startup(start)
    daemon.on_shutdown(close)
    return watch


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
    svc.on_loaded.append(freeze_now)  # the library's objects leave the collector's passes
    daemon.on_startup(svc.start)
    daemon.on_shutdown(svc.close)
    for op, handler in PatternOps(svc).handlers().items():
        daemon.register(op, handler)
    daemon.add_status("correlation", svc.status)
    return svc


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
    daemon.on_shutdown(closer(svc.close))
    if problem is not None:
        daemon.bus.emit("exec", "settings-refused", severity="alert", path=str(path),
                        error=problem)
    return svc


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


def closer(fn: Callable[[], None]) -> Callable[[], Awaitable[None]]:
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
