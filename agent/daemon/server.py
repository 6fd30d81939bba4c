"""``agentd``: the daemon entry point and the :class:`Daemon` that later modules plug into.

One process, one asyncio loop.  SIGTERM and SIGINT stop it cleanly: the control socket
and the pidfile are removed.  Other modules add ops with ``daemon.register(op, handler)``,
status fields with ``daemon.add_status(key, fn)``, set-up with ``on_startup`` (run before the
socket serves) and clean-up with ``on_shutdown``.  ``main`` attaches the cell manager
(agent.daemon.cellapi) unless ``--no-cells`` is given.

One agentd per state directory: ``main`` takes :class:`InstanceLock` (an exclusive
``flock`` on ``<state_dir>/agentd.lock``) before anything reads or writes state (journal,
socket, pid file), whether or not ``--no-cells`` is given; a second agentd exits 1 with
``E_BUSY`` naming the holder's pid.  ``--check`` takes no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import cbor2

from agent import __version__
from agent.core.config import AgentConfig
from agent.core.errors import AgentError, KernelError
from agent.core.events import SEVERITIES
from agent.core.features import summarize
from agent.core.protocol import MAX_FRAME, Handler, Peer, arg, check_args
from agent.daemon.bus import EventBus
from agent.daemon.control import ControlServer, Dispatcher
from agent.kernel import probes
from agent.kernel.cgroupdetect import detect
from agent.kernel.inherit import Inherited

__all__ = ["Daemon", "cgroup_mode"]

log = logging.getLogger("agentd")

_REPLY_BUDGET = MAX_FRAME - 1024  # room for the reply envelope around an events list
_MAX_FILTER = 64  # characters of a cell name or channel/kind pattern in an events filter


def cgroup_mode(proc_root: Path = Path("/proc"), fs_root: Path = Path("/")) -> str:
    """"v2", "v1" or "none": the kind of the layout the one detector
    (:func:`agent.kernel.cgroupdetect.detect`) finds; "none" when /proc is unreadable."""
    try:
        return detect(proc_root, fs_root).kind
    except KernelError:
        return "none"


class Daemon:
    """Holds config, event bus, dispatcher and control server of one agentd."""

    def __init__(self, config: AgentConfig, *, pidfile: Path | None = None,
                 proc_root: Path = Path("/proc"), fs_root: Path = Path("/"),
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 inherited: Inherited | None = None) -> None:
        self.config = config
        self.inherited = inherited if inherited is not None else Inherited()
        self.pidfile = pidfile if pidfile is not None else config.pidfile
        self.proc_root = proc_root
        self.fs_root = fs_root
        self.monotonic = monotonic
        self.bus = EventBus(clock=clock)
        self.bus.mark_state_change("started", "stopping")
        self.dispatcher = Dispatcher()
        self.dispatcher.on_refused = self._refused
        self.server = ControlServer(config.socket_path, self.dispatcher)
        self.started_at = monotonic()
        self._status: dict[str, Callable[[], Any]] = {"cells": lambda: 0}
        self._shutdown: list[Callable[[], Awaitable[None]]] = []
        self._startup: list[Callable[[], Awaitable[None]]] = []
        self._stop = asyncio.Event()
        self._wrote_pidfile = False
        self.register("ping", self._op_ping)
        self.register("status", self._op_status)
        self.register("events", self._op_events)
        self.register("events.follow", self._op_events_follow)
        self.register("whoami", self._op_whoami)

    def _refused(self, peer: Peer, op: str, code: str) -> None:
        """A request refused for who asks: ``agent/control-denied`` (the identity is the
        kernel's; channel 4's master-control-probing pattern counts them per uid)."""
        self.bus.emit("agent", "control-denied", severity="notice", uid=peer.uid,
                      pid=peer.pid, op=op, code=code)

    # ------------------------------------------------------------------ plug-in points
    def register(self, op: str, handler: Handler) -> None:
        self.dispatcher.register(op, handler)

    def add_status(self, key: str, fn: Callable[[], Any]) -> None:
        """Add (or replace, e.g. "cells") one field of the status reply."""
        self._status[key] = fn

    def on_startup(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` at start, after the socket is bound and before it serves (in order)."""
        self._startup.append(fn)

    def on_shutdown(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` at shutdown, before the socket goes (in reverse order of adding)."""
        self._shutdown.append(fn)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._stop = asyncio.Event()
        fd = self.inherited.claim("control")
        if fd is not None:  # respawned: the socket stays, queued connections included
            self.server.adopt(fd)
        else:
            self.server.bind()
        self._write_pidfile()
        await self._log_kernel_features()
        for fn in self._startup:
            await fn()
        await self.server.start()
        self.started_at = self.monotonic()
        self.bus.emit("master", "started", severity="notice", version=__version__,
                      pid=os.getpid(), socket=str(self.config.socket_path))
        log.info("agentd %s listening on %s", __version__, self.config.socket_path)

    async def _log_kernel_features(self) -> None:
        """What `agentctl checkconfig` would say, in the log and as an event: agentd then
        adapts (cgroup backend by detection, samples where PSI is missing, ...)."""
        try:
            report = await asyncio.to_thread(probes.check)
            lines = summarize(report)
        except Exception as exc:  # never keep agentd from starting over a report
            log.warning("kernel feature check failed: %s", exc)
            return
        for line in lines:
            log.info("%s", line)
        missing = [ln for ln in lines[1:] if "missing" in ln]
        self.bus.emit("master", "kernel-features", severity="notice" if missing else "info",
                      summary=lines[0], problems=lines[1:])

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self) -> None:
        self.bus.emit("master", "stopping", severity="notice")
        for fn in reversed(self._shutdown):
            try:
                await fn()
            except Exception:
                log.exception("shutdown hook %r failed", fn)
        await self.server.close()
        self._remove_pidfile()
        log.info("agentd stopped")

    async def run(self, *, install_signals: bool = True) -> None:
        """Start, serve until SIGTERM/SIGINT (or ``request_stop``), then stop."""
        loop = asyncio.get_running_loop()
        await self.start()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._stop.wait()
        finally:
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            await self.stop()

    def _write_pidfile(self) -> None:
        path = self.pidfile
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, path)
        self._wrote_pidfile = True

    def _remove_pidfile(self) -> None:
        if not self._wrote_pidfile:
            return
        with contextlib.suppress(OSError):
            if self.pidfile.read_text().strip() == str(os.getpid()):
                self.pidfile.unlink()
        self._wrote_pidfile = False

    # ------------------------------------------------------------------ built-in ops
    def status(self) -> dict[str, Any]:
        uts = os.uname()
        out: dict[str, Any] = {
            "version": __version__, "pid": os.getpid(),
            "uptime_s": round(self.monotonic() - self.started_at, 3),
            "kernel": uts.release, "machine": uts.machine,
            "cgroup": cgroup_mode(self.proc_root, self.fs_root),
            "events": self.bus.published,
        }
        for key, fn in self._status.items():
            try:
                out[key] = fn()
            except Exception as exc:
                log.exception("status field %s failed", key)
                out[key] = f"error: {exc}"
        return out

    async def _op_ping(self, peer: Peer, args: Mapping[str, Any]) -> str:
        check_args(args, ())
        return "pong"

    async def _op_status(self, peer: Peer, args: Mapping[str, Any]) -> dict[str, Any]:
        check_args(args, ())
        return self.status()

    async def _op_whoami(self, peer: Peer, args: Mapping[str, Any]) -> dict[str, int]:
        check_args(args, ())
        return peer.to_wire()

    def _filters(self, args: Mapping[str, Any]) -> dict[str, Any]:
        sev = arg(args, "severity", str)
        if sev is not None and sev not in SEVERITIES:
            raise AgentError("E_ARGS", f"unknown severity `{sev[:64]}`",
                             f"use one of {', '.join(SEVERITIES)}")
        out: dict[str, Any] = {"min_severity": sev}
        for name in ("cell", "channel", "kind"):
            value = arg(args, name, str)
            if value is not None and len(value) > _MAX_FILTER:
                # A glob is compiled to a regex: one of 60 KB blocks the loop for seconds.
                raise AgentError("E_ARGS", f"argument `{name}` is longer than {_MAX_FILTER} "
                                 "characters", "names are at most 64 characters long")
            out[name] = value
        return out

    async def _op_events(self, peer: Peer, args: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Newest ``n`` matching events (oldest first), trimmed to fit one reply."""
        check_args(args, ("n", "cell", "channel", "kind", "severity"))
        n = arg(args, "n", int, 20)
        assert n is not None
        if n < 0:
            raise AgentError("E_ARGS", "argument `n` must not be negative")
        events = self.bus.recent(n, **self._filters(args))
        out: list[dict[str, Any]] = []
        budget = _REPLY_BUDGET
        for ev in reversed(events):
            wire = ev.to_wire()
            budget -= _wire_size(wire)
            if budget < 0:
                break
            out.append(wire)
        out.reverse()
        return out

    async def _op_events_follow(self, peer: Peer, args: Mapping[str, Any]
                                ) -> AsyncIterator[dict[str, Any]]:
        """Streamed: the last ``n`` matching events, then each new one as it comes.  When
        the subscriber queue overflowed, a ``{"dropped": count}`` item says so."""
        check_args(args, ("n", "cell", "channel", "kind", "severity"))
        n = arg(args, "n", int, 0)
        assert n is not None
        filters = self._filters(args)
        with self.bus.subscribe(**filters) as sub:
            for ev in self.bus.recent(n, **filters) if n > 0 else []:
                yield ev.to_wire()
            seen = 0
            while True:
                ev = await sub.get()
                if sub.dropped != seen:
                    yield {"dropped": sub.dropped - seen}
                    seen = sub.dropped
                yield ev.to_wire()


def _wire_size(wire: dict[str, Any]) -> int:
    try:
        return len(cbor2.dumps(wire))
    except Exception:
        return _REPLY_BUDGET + 1


# ---------------------------------------------------------------------- one agentd per state dir


# ---------------------------------------------------------------------- entry point


