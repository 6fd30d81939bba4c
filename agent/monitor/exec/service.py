"""Channel 1 on agentd's loop: every exec in a cell checked before it runs (docs/exec.md).

One fanotify group per cell, made when the cell's pid 1 has built its root and before it
may exec (:meth:`ExecService.on_root`, from the spawn handshake's worker thread),
marking every mount of the cell (:func:`~agent.monitor.exec.adapter.mark_cell`).  On the
loop, one read per callback; the process's cell from its cgroup (a live host process is
allowed); the file's SHA-256 cached by (device, inode, size, mtime, ctime) for image
files, else hashed in a worker thread on the fanotify fd; :func:`~agent.monitor.exec.
rules.decide` answers.  Every event read is answered exactly once, any error denies
(fail closed, reported).  An allowed image file gets an ignored mask: the kernel answers
its next execs until it is written to (or the signature database changes: flushed).  A
cell over its rate (a TokenBucket) is not read for a while: its threads wait, no others.
Across a respawn of the master the groups are passed on (:meth:`kept`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import os
import select
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError, ConfigError
from agent.core.events import Event
from agent.core.manifest import Manifest
from agent.core.ratelimit import TokenBucket
from agent.core.sandbox import SpawnSpec
from agent.core.seal import Seal
from agent.kernel.fanotify import FanEvent, Group, permission_events
from agent.kernel.seal import hash_fd
from agent.kernel.spawn import Spawned, spawn_cell
from agent.monitor.exec.adapter import Facts, SealCache, alive, facts, identity, mark_cell
from agent.monitor.exec.rules import Observed, Verdict, decide
from agent.monitor.exec.service_signatures import SignatureKeeper
from agent.monitor.exec.service_watch import (
    Backend,
    Directory,
    Pending,
    Watch,
    denial_attrs,
    hash_and_close,
    ignore_unchanged,
    load_seal,
    queued,
    written_attrs,
    written_path,
)
from agent.monitor.exec.settings import ExecSettings

__all__ = ["INHERIT_PREFIX", "Backend", "Directory", "ExecService"]

log = logging.getLogger(__name__)

INHERIT_PREFIX = "fanotify:exec:"  # + "perm:" or "notif:" + cell
WRITTEN_HASH_MAX = 16 << 20  # a written file larger than this is reported without a hash
MAX_DRAIN_READS = 16  # of a gone cell's group: 16 reads of up to 170 events
_NO_SEAL = Seal.of([])


class ExecService:
    """See the module doc.  ``on_root`` and ``spawn`` run in any thread, the rest on
    the loop."""

    def __init__(self, bus: Any, settings: ExecSettings, *,
                 inherited: Mapping[str, int] | None = None, proc: Path = Path("/proc")) -> None:
        self.bus = bus
        self.settings = settings
        self.proc = proc
        self.permission = settings.enforce  # False: report only
        self.directory: Directory | None = None
        self.backend: Backend | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.signatures = SignatureKeeper(bus, settings.signatures, self._forget)
        self.counts = collections.Counter[str]({k: 0 for k in (
            "allowed", "denied", "unverified", "cached", "hashed", "ignored", "host", "errors",
            "throttled", "read_errors", "written")})
        self._watches: dict[str, Watch] = {}
        self._lock = threading.Lock()
        self._inherited = dict(inherited or {})
        self._seals = SealCache()
        self._cache: collections.OrderedDict[tuple[int, ...], str] = collections.OrderedDict()
        self._jobs: dict[tuple[int, ...], asyncio.Future[tuple[str, int]]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="exec-hash")

    # ------------------------------------------------------------------ wiring
    def attach(self, directory: Directory, backend: Backend) -> None:
        """Before the manager starts (and may spawn): the loop, the cells, attribution,
        and whether the kernel can deny (else report only, said once)."""
        self.loop = asyncio.get_running_loop()
        self.directory, self.backend = directory, backend
        if self.settings.enforce and permission_events() is False:
            self.permission = False
            log.error("exec: the kernel has no fanotify permission events: report only")
        self.bus.emit("exec", "mode", severity="notice" if self.permission or
                      not self.settings.enforce else "alert",
                      mode="enforce" if self.permission else "report",
                      configured=self.settings.mode, allow_unsealed=self.settings.allow_unsealed)
        self.bus.add_sink(self._on_lifecycle, all_events=True, channel="lifecycle",
                          name="exec-lifecycle")

    async def start(self) -> None:
        """After the manager adopted its cells: the signature database, and a watch on
        every live cell that has none (after a restart of agentd)."""
        await self.signatures.start()
        for cell, e in list(self.directory.cells.items() if self.directory else ()):
            if e.pid is None or cell in self._watches:
                continue
            try:
                await asyncio.to_thread(self._install, cell, e.pid, e.manifest.image_root,
                                        e.manifest)
            except (AgentError, OSError) as exc:
                log.error("exec: cell %s runs unwatched: %s", cell, exc)
                self.bus.emit("exec", "watch-failed", cell=cell, severity="alert",
                              error=str(exc))
        for name, fd in self._inherited.items():
            log.warning("exec: inherited group %s has no cell: closed", name)
            os.close(fd)
        self._inherited.clear()

    def spawn(self, spec: SpawnSpec) -> Spawned:
        """:func:`agent.kernel.spawn.spawn_cell` with the exec marks made before pid 1
        may exec (the spawner's ``spawn``)."""
        return spawn_cell(spec, on_root=functools.partial(self.on_root, spec))

    def on_root(self, spec: SpawnSpec, pid: int) -> None:
        """Pid 1 of cell ``spec.hostname`` has its root and its cgroup and waits: mark
        its mounts.  Raising fails the spawn (the cell does not start)."""
        cell = spec.hostname
        e = self.directory.cells.get(cell) if self.directory else None
        self._install(cell, pid, spec.rootfs, e.manifest if e is not None else None)

    def kept(self) -> dict[str, int]:
        """The groups to pass to the next master (respawn)."""
        return {f"{INHERIT_PREFIX}{'perm' if w.group.permission else 'notif'}:{c}":
                w.group.fileno() for c, w in self._watches.items() if not w.closed}

    def close(self) -> None:
        for cell in list(self._watches):
            self._drop(cell)
        if self.directory is not None:
            self.bus.remove_sink(self._on_lifecycle)
        self.signatures.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def status(self) -> dict[str, Any]:
        return {"mode": "off" if not self._watches and self.loop is None else
                ("enforce" if self.permission else "report"),
                "cells": len(self._watches), "signatures": len(self.signatures.db),
                "cached": len(self._cache), "waiting": sum(len(w.waiting) for w in
                                                          self._watches.values()),
                **dict(self.counts)}

    # ------------------------------------------------------------------ cells
    def _install(self, cell: str, pid: int, rootfs: str, m: Manifest | None) -> None:
        """Load the seal, make or reuse the cell's group, mark its mounts (any thread)."""
        seal_file, seal = load_seal(self._seals, cell, rootfs, m, self.settings.allow_unsealed)
        dev = os.stat(rootfs).st_dev
        data = (m.data.path, m.data.source) if m is not None and m.data is not None else None
        with self._lock:
            w = self._watches.get(cell)
            new = w is None
            if w is None:
                w = Watch(cell, self._group(cell), seal, dev,
                           TokenBucket(self.settings.rate, self.settings.burst), data)
                self._watches[cell] = w
            else:
                w.seal, w.image_dev, w.data = seal, dev, data
                w.group.forget()  # its seal may differ: what the kernel ignored is asked
        try:
            marked = mark_cell(w.group, pid, self.proc,
                               frozenset({data[0]}) if data is not None else frozenset())
        except BaseException:
            if new:
                with self._lock:
                    self._watches.pop(cell, None)
                w.group.close()
            raise
        if self.loop is None:
            raise ConfigError("E_UNAVAILABLE", "exec: not attached to a loop")
        if new:
            self.loop.call_soon_threadsafe(self._register, w)
        self.loop.call_soon_threadsafe(functools.partial(
            self.bus.emit, "exec", "watching", cell=cell, mounts=len(marked), pid=pid,
            sealed=seal is not None, seal=seal_file))
        if seal is None:
            self.loop.call_soon_threadsafe(functools.partial(
                self.bus.emit, "exec", "unsealed-image", cell=cell, severity="notice",
                image=rootfs, seal=seal_file))

    def _group(self, cell: str) -> Group:
        kind = "perm" if self.permission else "notif"
        for k in ("perm", "notif"):
            fd = self._inherited.pop(f"{INHERIT_PREFIX}{k}:{cell}", None)
            if fd is not None and k == kind:
                g = Group.adopt(fd, self.permission)
                g.forget()  # the previous master's ignored files: asked again
                return g
            if fd is not None:
                os.close(fd)
        return Group.open(self.permission)

    def _forget(self) -> None:  # a new signature database: ask about every file again
        for w in list(self._watches.values()):
            with contextlib.suppress(AgentError):
                w.group.forget()

    def _register(self, w: Watch) -> None:
        if w.closed or w.registered or self.loop is None:
            return
        w.registered = True
        self.loop.add_reader(w.group.fileno(), self._on_ready, w)

    def _on_lifecycle(self, ev: Event) -> None:
        if ev.kind in ("destroyed", "failed") and ev.cell is not None:
            self._drop(ev.cell)

    def _drop(self, cell: str) -> None:
        """The cell is gone: answer what waits (deny), close its group."""
        with self._lock:
            w = self._watches.pop(cell, None)
        if w is None:
            return
        w.closed = True
        if w.paused is not None:
            w.paused.cancel()
        elif w.registered and self.loop is not None:
            self.loop.remove_reader(w.group.fileno())
        for p in list(w.waiting.values()):
            self._answer(w, p, False)
        self._last_writes(w)
        w.group.close()

    def _last_writes(self, w: Watch) -> None:
        """Before a gone cell's group is closed: what it still queues.  A write just
        before the cell ended is reported (a notification the loop had not read yet: a
        oneshot that drops a file and exits); an exec still asked about is denied."""
        for ev in queued(w.group, MAX_DRAIN_READS):
            if ev.written:
                self._written(w, ev, os.dup(ev.fd))
            if ev.permission:
                with contextlib.suppress(AgentError):
                    w.group.respond(ev.fd, False)
            os.close(ev.fd)

    # ------------------------------------------------------------------ events
    def _on_ready(self, w: Watch) -> None:
        try:
            events = w.group.read()
        except (AgentError, ValueError) as exc:
            self.counts["read_errors"] += 1
            log.error("exec: cell %s: %s", w.cell, exc)
            return
        for ev in events:
            if ev.overflow:
                self.bus.emit("exec", "overflow", cell=w.cell, severity="alert")
            elif ev.fd >= 0 and ev.written:  # (a notification: may be merged with an exec)
                self._written(w, ev, os.dup(ev.fd) if ev.exec else ev.fd)
                if ev.exec:
                    self._check(w, Pending(ev))
            elif ev.fd >= 0:
                self._check(w, Pending(ev))
        if events and self.loop is not None:
            wait = w.bucket.take(self.loop.time(), len(events))
            if wait > 0:
                self._pause(w, wait)

    def _check(self, w: Watch, p: Pending) -> None:
        w.waiting[p.event.fd] = p
        try:
            p.facts = f = facts(p.event.fd)
            cell = self._attribute(w, p.event)
            if cell is None:  # a host process: trusted
                self.counts["host"] += 1
                self._answer(w, p, True)
                return
            p.cell = cell
            p.on_image = cell == w.cell and f.regular and f.dev == w.image_dev
            digest = self._cache.get(f.key) if p.on_image else None
            if digest is not None:
                self._cache.move_to_end(f.key)
                self.counts["cached"] += 1
                self._finish(w, p, digest, f.size)
                return
            job = self._jobs.get(f.key) if p.on_image else None
            if job is None:
                assert self.loop is not None
                job = self.loop.run_in_executor(self._pool, hash_and_close, os.dup(p.event.fd))
                if p.on_image:
                    self._jobs[f.key] = job
                    job.add_done_callback(functools.partial(self._hashed_key, f))
            job.add_done_callback(functools.partial(self._hashed, w, p))
        except Exception as exc:  # fail closed: deny, say why
            self._fail(w, p, exc)

    def _written(self, w: Watch, ev: FanEvent, fd: int) -> None:
        """A file of the cell's data dir was written: ``exec/file-written`` with its hash
        (hashed in the worker; above WRITTEN_HASH_MAX, none).  ``fd`` is ours to close."""
        try:
            f = facts(fd)
            cell = self._attribute(w, ev)
        except Exception as exc:
            os.close(fd)
            self.counts["errors"] += 1
            log.error("exec: cell %s: a written file: %s", w.cell, exc)
            return
        if cell is None or not f.regular:  # a host process's write (the agent's own)
            os.close(fd)
            return
        who = identity(ev.pid, self.proc)
        path = written_path(w, f.path, w.closed)

        def report(hashed: tuple[str, int] | None) -> None:
            self.counts["written"] += 1
            self.bus.emit("exec", "file-written", cell=cell, severity="info",
                          **written_attrs(w, f, path, ev.pid, who, hashed))

        if f.size > WRITTEN_HASH_MAX or self.loop is None:
            os.close(fd)
            report(None)
            return
        job = self.loop.run_in_executor(self._pool, hash_and_close, fd)
        job.add_done_callback(lambda j: report(None if j.cancelled() or j.exception()
                                               else j.result()))

    def _attribute(self, w: Watch, ev: FanEvent) -> str | None:
        """The process's cell: ``w``'s, another cell's, or None for a live host process.
        One gone or a zombie (its cgroup is then the root) raises (denied: it would not
        run anyway); after the fact (report mode) it is ``w``'s, whose mount it used."""
        found = self.backend.pid_to_cell(ev.pid) if self.backend is not None else w.cell
        if found == w.cell or (found is not None and self.directory is not None
                               and found in self.directory.cells):
            return found
        if not alive(ev.pid, self.proc):
            if not ev.permission:
                return w.cell
            raise ProcessLookupError(f"pid {ev.pid} is gone")
        return None

    def _hashed_key(self, f: Facts, job: asyncio.Future[tuple[str, int]]) -> None:
        self._jobs.pop(f.key, None)
        if not job.cancelled() and job.exception() is None and job.result()[1] == f.size:
            self._cache[f.key] = job.result()[0]
            while len(self._cache) > self.settings.cache:
                self._cache.popitem(last=False)

    def _hashed(self, w: Watch, p: Pending, job: asyncio.Future[tuple[str, int]]) -> None:
        if p.done:
            return
        try:
            digest, size = job.result()
            self.counts["hashed"] += 1
            self._finish(w, p, digest, size)
        except Exception as exc:
            self._fail(w, p, exc)

    def _finish(self, w: Watch, p: Pending, digest: str, size: int) -> None:
        assert p.facts is not None
        other = self._watches.get(p.cell)
        seal = w.seal if p.cell == w.cell else (other.seal if other else _NO_SEAL)
        obs = Observed(p.facts.path, digest, size, p.facts.mode, p.on_image)
        verdict = decide(obs, seal, self.signatures.db.digests)
        if verdict.allow:
            if p.on_image and p.event.permission and not w.closed and ignore_unchanged(
                    w.group, p.event.fd, p.facts):
                self.counts["ignored"] += 1  # the kernel answers its next execs
            self._answer(w, p, True)
            self.counts["allowed"] += 1
            return
        who = identity(p.event.pid, self.proc)  # while it waits: a refused one soon ends
        self._answer(w, p, False)
        self._report(p, verdict, obs, who)

    def _fail(self, w: Watch, p: Pending, exc: BaseException) -> None:
        self.counts["errors"] += 1
        log.error("exec: cell %s pid %d: check failed, denied: %s", w.cell, p.event.pid, exc)
        path = p.facts.path if p.facts is not None else None
        self._answer(w, p, False)
        self.bus.emit("exec", "exec-denied" if w.group.permission else "exec-unverified",
                      cell=p.cell or w.cell, severity="alert", path=path, hash=None,
                      hpid=p.event.pid, pid=None, reason="error", op="exec", error=str(exc))

    def _answer(self, w: Watch, p: Pending, allow: bool) -> None:
        """Answer ``p`` once (a notification needs no answer) and close its fd."""
        if p.done:
            return
        p.done = True
        w.waiting.pop(p.event.fd, None)
        try:
            if p.event.permission and not w.group.closed:
                w.group.respond(p.event.fd, allow)
        except AgentError as exc:
            log.error("exec: cell %s: answer not delivered: %s", w.cell, exc)
        finally:
            os.close(p.event.fd)

    def _report(self, p: Pending, v: Verdict, obs: Observed,
                who: tuple[int | None, str | None]) -> None:
        enforce = p.event.permission
        self.counts["denied" if enforce else "unverified"] += 1
        attrs = denial_attrs(self._watches.get(p.cell), p, v, obs, who)
        self.bus.emit("exec", "exec-denied" if enforce else "exec-unverified", cell=p.cell,
                      severity="alert", **attrs)

    def _pause(self, w: Watch, wait: float) -> None:
        if w.paused is not None or w.closed or self.loop is None:
            return
        self.loop.remove_reader(w.group.fileno())
        w.paused = self.loop.call_later(wait, self._resume, w)
        self.counts["throttled"] += 1
        self.bus.emit("master", "throttled", cell=w.cell, severity="notice", what="execs",
                      wait_ms=round(wait * 1000, 1))

    def _resume(self, w: Watch) -> None:
        w.paused = None
        if not w.closed and self.loop is not None:
            self.loop.add_reader(w.group.fileno(), self._on_ready, w)

    async def settle(self, timeout: float = 30.0) -> bool:
        """Until every event queued now is read and answered; False on timeout."""
        assert self.loop is not None
        until = self.loop.time() + timeout
        while self.loop.time() < until:
            fds = [w.group.fileno() for w in self._watches.values() if not w.closed]
            if not any(w.waiting for w in self._watches.values()) and not (
                    fds and select.select(fds, [], [], 0)[0]):
                return True
            await asyncio.sleep(0.01)
        return False

    # ------------------------------------------------------------------ respawn
    def flush(self) -> None:
        """Before the master re-executes itself: answer every event read and not yet
        answered (hashed here, synchronously); what is still queued in the kernel waits
        for the next master, which inherits the groups."""
        for w in list(self._watches.values()):
            for p in list(w.waiting.values()):
                with contextlib.suppress(Exception):
                    if p.facts is None or not p.cell:
                        self._answer(w, p, False)
                        continue
                    digest, size = hash_fd(p.event.fd)
                    self._finish(w, p, digest, size)
                if not p.done:
                    self._answer(w, p, False)
