"""``agentd``: the daemon entry point and the :class:`Daemon` that later modules plug into.

One process, one asyncio loop.  SIGTERM and SIGINT stop it cleanly: the control socket
and the pidfile are removed.  Other modules add ops with ``daemon.register(op, handler)``,
status fields with ``daemon.add_status(key, fn)``, set-up with ``on_startup`` (run before the
socket serves) and clean-up with ``on_shutdown``.  ``main`` attaches the cell manager
(agent.masterops) unless ``--no-cells`` is given.

One agentd per state directory: ``main`` takes :class:`InstanceLock` (an exclusive
``flock`` on ``<state_dir>/agentd.lock``) before anything reads or writes state (journal,
socket, pid file), whether or not ``--no-cells`` is given; a second agentd exits 1 with
``E_BUSY`` naming the holder's pid.  ``--check`` takes no lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import cbor2

from agent import __version__
from agent.config import DEFAULT_CONFIG_PATH, LOG_LEVELS, AgentConfig, load_config
from agent.control import ControlServer, Dispatcher, Handler, Peer, arg, check_args
from agent.errors import AgentError, KernelError
from agent.events import SEVERITIES, EventBus
from agent.protocol import MAX_FRAME

__all__ = ["LOCK_NAME", "Daemon", "InstanceBusyError", "InstanceLock", "cgroup_mode",
           "detect_cgroup_mode", "main"]

log = logging.getLogger("agentd")

_REPLY_BUDGET = MAX_FRAME - 1024  # room for the reply envelope around an events list
LOCK_NAME = "agentd.lock"


def cgroup_mode(mounts: str) -> str:
    """"v2", "v1" or "none" from the text of /proc/self/mounts.

    cgroup2 mounted on /sys/fs/cgroup is v2; any v1 hierarchy otherwise (a "hybrid" host
    keeps its controllers on v1) is v1; a cgroup2 mount elsewhere is v2.
    """
    v1 = v2_elsewhere = False
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        target, fstype = fields[1], fields[2]
        if fstype == "cgroup2":
            if target == "/sys/fs/cgroup":
                return "v2"
            v2_elsewhere = True
        elif fstype == "cgroup":
            v1 = True
    return "v1" if v1 else "v2" if v2_elsewhere else "none"


def detect_cgroup_mode(proc_root: Path = Path("/proc")) -> str:
    try:
        return cgroup_mode((proc_root / "self" / "mounts").read_text())
    except OSError:
        return "none"


class Daemon:
    """Holds config, event bus, dispatcher and control server of one agentd."""

    def __init__(self, config: AgentConfig, *, pidfile: Path | None = None,
                 proc_root: Path = Path("/proc"), clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.pidfile = pidfile if pidfile is not None else config.pidfile
        self.proc_root = proc_root
        self.monotonic = monotonic
        self.bus = EventBus(clock=clock)
        self.bus.mark_state_change("started", "stopping")
        self.dispatcher = Dispatcher()
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
            from agent import checkconfig

            report = await asyncio.to_thread(checkconfig.check)
            lines = checkconfig.summarize(report)
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
            "cgroup": detect_cgroup_mode(self.proc_root),
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
            raise AgentError("E_ARGS", f"unknown severity `{sev}`",
                             f"use one of {', '.join(SEVERITIES)}")
        return {"cell": arg(args, "cell", str), "channel": arg(args, "channel", str),
                "kind": arg(args, "kind", str), "min_severity": sev}

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

class InstanceBusyError(AgentError):
    """Another process holds the instance lock of this state directory."""

    def __init__(self, path: Path, holder: int | None) -> None:
        self.path = path
        self.holder = holder
        who = f"pid {holder}" if holder is not None else "a process whose pid is not written yet"
        super().__init__(
            "E_BUSY", f"another agentd ({who}) holds `{path}`",
            "one agentd per state dir: stop it first (/etc/init.d/S50agentd stop), or use "
            "another --state-dir; the lock goes by itself when its holder dies")


class InstanceLock:
    """An exclusive, non-blocking ``flock`` on ``<state_dir>/agentd.lock``, held while open.

    The kernel drops a flock when the last descriptor of its open file goes, so a lock
    left by a dead (even kill -9'd) agentd is free at once: no stale-lock clean-up, and
    the file is never removed (removing it would let two holders lock two inodes).  The
    descriptor is O_CLOEXEC: cells and tools agentd execs do not inherit it.  The
    holder's pid is written into the file for the refusal message; a loser only reads.
    """

    def __init__(self, state_dir: Path, *, pid_wait: float = 1.0) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None
        self._pid_wait = pid_wait

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> InstanceLock:
        """Take the lock or raise :class:`InstanceBusyError` (or KernelError: cannot open)."""
        if self._fd is not None:
            return self
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise KernelError.from_oserror(
                "open", str(self.path), exc,
                "agentd needs a writable state dir (see --state-dir)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise InstanceBusyError(self.path, self._holder(fd)) from None
                raise KernelError.from_oserror("flock", str(self.path), exc) from None
            finally:
                os.close(fd)
        try:  # new pid first, then cut: a reader never sees an empty file once one was written
            data = f"{os.getpid()}\n".encode()
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        except OSError as exc:
            os.close(fd)
            raise KernelError.from_oserror("write", str(self.path), exc) from None
        self._fd = fd
        return self

    def _holder(self, fd: int) -> int | None:
        """The holder's pid from the file; it may not be written yet just after its flock."""
        deadline = time.monotonic() + self._pid_wait
        while True:
            with contextlib.suppress(OSError, ValueError):
                first = os.pread(fd, 64, 0).split(b"\n", 1)[0]
                if first.strip():
                    return int(first)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> InstanceLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------- entry point

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
    try:
        ns = _parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
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
    lock = InstanceLock(config.state_dir)
    try:
        lock.acquire()
    except AgentError as exc:
        log.error("%s", exc)
        return 1
    try:
        daemon = Daemon(config, pidfile=ns.pidfile.absolute() if ns.pidfile else None)
        if not ns.no_cells:
            from agent.masterops import attach

            attach(daemon)
        asyncio.run(daemon.run())
    except AgentError as exc:
        log.error("%s", exc)
        return 1
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())

