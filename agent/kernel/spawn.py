"""Start a cell's first process from raw namespaces (no runc, crun or bwrap).

``spawn_cell(spec)`` checks and plans everything in agentd (:func:`_plan`), then forks
once (:func:`_fork`); the child (:mod:`agent.kernel.spawnchild`) enters the namespaces
and forks the cell's pid 1, which builds the root, drops privileges, installs the
seccomp filter and execs.  The intermediate exits at once, so pid 1 is reparented to
agentd (a child subreaper): no helper process stays per cell.  While the child works,
agentd answers its handshake (:class:`_Handshake`, over the messages and the table of
:mod:`agent.core.handshake`): the uid/gid maps and the move into the cell's cgroup are
the two steps only the host's root can do.  docs/sandbox.md has every step.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import itertools
import logging
import os
import resource
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.core.errors import ConfigError, KernelError
from agent.core.handshake import (
    SYNC_FAIL,
    SYNC_OK,
    HandshakeError,
    Msg,
    Phase,
    decode,
    next_phase,
)
from agent.core.sandbox import SpawnSpec, UidMap, check_spec, exec_paths, plan_mounts, unshare_flags
from agent.kernel import libc
from agent.kernel.spawnchild import ChildPlan
from agent.kernel.spawnchild import run as run_child

__all__ = ["Spawned", "spawn_cell"]

_HINTS = {
    ("mount", errno.ENOENT): "the image must contain the mount point",
    ("mount", errno.EACCES): "with a user namespace, the mapped uid must be able to reach the path",
    ("execve", errno.ENOENT): "is the command in the image (absolute path or PATH)?",
    ("execve", errno.EACCES): "not executable, or on a noexec mount",
    ("execve", errno.EPERM): "refused by the exec monitor (is it in the image's seal?) or "
                             "the seccomp filter: agentctl events shows which",
}
# AGENT_SPAWN_TRACE=1 in agentd's environment: the child reports a CLOCK_MONOTONIC
# timestamp per step over the status pipe and the parent logs them (docs/performance.md).
_TRACE = os.environ.get("AGENT_SPAWN_TRACE", "") not in ("", "0")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Spawned:
    pid: int  # host pid of the cell's pid 1
    pidfd: int
    seccomp_fd: int | None  # non-blocking listener, for loop.add_reader


def _plan(spec: SpawnSpec) -> ChildPlan:
    """The spec checked (:func:`agent.core.sandbox.check_spec`) and resolved against the
    running system: the image's real path, rlimit numbers, the kernel's capabilities."""
    keep = check_spec(spec)
    root = os.path.realpath(spec.rootfs)
    if not os.path.isdir(root) or root == "/":
        raise KernelError("stat", spec.rootfs, errno.ENOTDIR, "rootfs must be an image directory")
    try:
        limits = tuple((getattr(resource, "RLIMIT_" + n.upper()), s, h) for n, s, h in spec.rlimits)
    except AttributeError as e:
        raise ConfigError("E_SPAWN", f"unknown rlimit {e}", "use names like nofile") from e
    env = dict(spec.env)
    return ChildPlan(
        spec, root, plan_mounts(root, spec.mounts, spec.uid, spec.gid, os.statvfs(root).f_flag),
        unshare_flags(spec), tuple(c for c in range(libc.cap_last_cap() + 1) if c not in keep),
        sum(1 << c for c in keep), keep, limits, exec_paths(spec.argv[0], env), env, _TRACE)


def _high(fd: int) -> int:
    """Move ``fd`` to >= 3 so dup2 onto 0-2 in the child cannot clobber it."""
    if fd >= 3:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return new


def _write(path: str, text: str, hint: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise KernelError.from_oserror("write", path, e, hint) from None


def _write_maps(pid: int, m: UidMap) -> None:
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {m.base} {m.count}\n"),
                       ("gid_map", f"0 {m.base} {m.count}\n")):
        _write(f"/proc/{pid}/{name}", text, "is the uid range free?")


def _reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


class _Handshake:
    """agentd's side of :mod:`agent.core.handshake` for one spawn."""

    def __init__(self, spec: SpawnSpec, inter: int, sync_w: int, t_fork: int,
                 on_root: Callable[[int], None] | None = None) -> None:
        self.spec, self.inter, self.sync_w = spec, inter, sync_w
        self.on_root = on_root
        self.phase = Phase.STARTED
        self.cell: int | None = None  # pid 1's host pid
        self.pidfd: int | None = None
        self.failure: tuple[str, str, int] | None = None
        self.trace: list[tuple[str, int]] = [("fork", t_fork)]

    def _answer(self, step: str, target: str) -> None:
        """Do the privileged step for the child, then tell it whether it worked."""
        try:
            if step == "maps":
                assert self.spec.userns is not None
                _write_maps(self.inter, self.spec.userns)
            else:
                assert self.spec.cgroup_path is not None and self.cell is not None
                _write(f"{self.spec.cgroup_path}/cgroup.procs", str(self.cell),
                       "does the cell's cgroup exist?")
                if self.on_root is not None:  # its root is built; it waits: nothing ran
                    self.on_root(self.cell)
        except Exception:
            os.write(self.sync_w, SYNC_FAIL)
            raise
        os.write(self.sync_w, SYNC_OK)

    def feed(self, raw: bytes) -> None:
        line = decode(raw, self.phase)
        before, self.phase = self.phase, next_phase(self.phase, line.msg)
        if line.msg is Msg.TRACE:
            self.trace.append((line.fields[0], int(line.fields[1])))
        elif line.msg is Msg.FAILED:
            if before is not Phase.FAILED:  # the first failure is the one reported
                self.failure = (line.fields[0], line.fields[1], int(line.fields[2]))
        elif line.msg is Msg.USERNS:
            if self.spec.userns is None:
                raise KernelError("spawn", "handshake", errno.EPROTO, "USERNS without userns")
            self._answer("maps", "")
        elif line.msg is Msg.PID:
            self.cell = int(line.fields[0])
            self.pidfd = libc.pidfd_open(self.cell)  # our (grand)child: its pid cannot recycle
            if before is Phase.JOIN_ASKED:  # pid 1 asked before its pid was known
                self._answer("cgroup", "")
        elif line.msg is Msg.CGROUP:
            if not self.spec.cgroup_path:
                raise KernelError("spawn", "handshake", errno.EPROTO, "CGROUP without a cgroup")
            if self.cell is not None:
                self._answer("cgroup", "")

    def log_trace(self) -> None:
        if len(self.trace) > 1:
            self.trace.append(("exec", time.monotonic_ns()))
            log.info("spawn %s: %s", self.spec.hostname, " ".join(
                f"{step}+{(ts - prev) / 1e6:.1f}ms"
                for (_, prev), (step, ts) in itertools.pairwise(self.trace)))


def _fork(plan: ChildPlan, status: tuple[int, int], sync: tuple[int, int],
          socks: tuple[socket.socket, socket.socket]) -> int:
    """Fork the child (which never returns here); the parent's pid of it."""
    parent = os.getpid()
    # No garbage collection in the child: a collection there walks (and so writes to)
    # every object agentd has, copying agentd's whole heap page by page (copy-on-write);
    # under emulation that alone took seconds.  The child execs soon, so it never needs
    # one; the parent turns collection back on at once.
    gc_on = gc.isenabled()
    gc.disable()
    try:
        inter = os.fork()
    finally:
        if gc_on and os.getpid() == parent:
            gc.enable()
    if inter == 0:
        os.close(status[0])
        os.close(sync[1])
        socks[0].close()
        run_child(plan, status[1], sync[0], socks[1], parent)
    return inter


def _read_status(hs: _Handshake, status_r: int, deadline: float) -> None:
    """Feed every status line to the handshake until the child closes the pipe."""
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([status_r], [], [], left)[0]:
            raise KernelError("spawn", hs.spec.argv[0], errno.ETIMEDOUT, "the child hung")
        chunk = os.read(status_r, 4096)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            hs.feed(line)


def _receive_listener(psock: socket.socket) -> int:
    psock.setblocking(False)
    _msg, fds, _fl, _addr = socket.recv_fds(psock, 1, 1)
    if not fds:
        raise KernelError("recvmsg", "seccomp listener", errno.EBADMSG)
    os.set_blocking(fds[0], False)
    return fds[0]


def spawn_cell(spec: SpawnSpec, *, on_root: Callable[[int], None] | None = None) -> Spawned:
    """Create the namespaces and exec the cell's first process; see the module doc.

    ``on_root(pid)`` is called with pid 1's host pid once pid 1 has built its root and
    joined its cgroup (the ``CGROUP`` step), before it may exec: the exec monitor marks
    the cell's mounts there.  If it raises, pid 1 is told to exit and the spawn fails.
    It needs a ``cgroup_path`` (that step).

    Raises ConfigError for a bad spec and KernelError naming the failed step; on failure
    every process created here is killed and reaped (the mounts lived in the cell's own
    mount namespace and vanish with it)."""
    plan = _plan(spec)
    if on_root is not None and not spec.cgroup_path:
        raise ConfigError("E_SPAWN", "on_root needs a cgroup_path (the CGROUP step)",
                          "give the cell a cgroup")
    libc.set_child_subreaper(True)
    status_r, status_w = (_high(fd) for fd in os.pipe2(os.O_CLOEXEC))
    sync_r, sync_w = (_high(fd) for fd in os.pipe2(os.O_CLOEXEC))
    psock, csock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sk in (psock, csock):
        if sk.fileno() < 3:
            sk.close()
            raise KernelError("socketpair", "fd", errno.EBADF, "agentd must keep fds 0-2 open")
    t_fork = time.monotonic_ns()
    inter = _fork(plan, (status_r, status_w), (sync_r, sync_w), (psock, csock))
    os.close(status_w)
    os.close(sync_r)
    csock.close()
    hs = _Handshake(spec, inter, sync_w, t_fork, on_root)
    listener: int | None = None
    inter_alive = True
    try:
        _read_status(hs, status_r, time.monotonic() + spec.timeout)
        os.waitpid(inter, 0)
        inter_alive = False
        hs.log_trace()
        if hs.failure:
            op, target, err = hs.failure
            raise KernelError(op, target, err, _HINTS.get((op.split("(")[0], err)))
        if hs.cell is None or hs.pidfd is None or hs.phase is not Phase.READY:
            raise KernelError("fork", spec.argv[0], errno.ECHILD,
                              f"the set-up child ended early ({hs.phase.value})")
        if spec.seccomp is not None:
            listener = _receive_listener(psock)
        return Spawned(hs.cell, hs.pidfd, listener)
    except BaseException:
        if inter_alive:
            _reap(inter)
        os.close(sync_w)  # a pid 1 waiting for an answer reads EOF and exits
        sync_w = -1
        if hs.cell is None:
            _late_pid(hs, status_r)
        if hs.cell is not None:
            _reap(hs.cell)
        for fd in (hs.pidfd, listener):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        os.close(status_r)
        if sync_w >= 0:
            os.close(sync_w)
        psock.close()


def _late_pid(hs: _Handshake, status_r: int, wait: float = 2.0) -> None:
    """The handshake failed before the intermediate reported pid 1 (which it may still
    have forked): read what is left of the status pipe for its PID line, so that pid 1
    is reaped too and no cell process outlives a failed spawn."""
    deadline, buf = time.monotonic() + wait, b""
    while hs.cell is None and time.monotonic() < deadline:
        if not select.select([status_r], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return
        chunk = os.read(status_r, 4096)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf and hs.cell is None:
            raw, buf = buf.split(b"\n", 1)
            with contextlib.suppress(HandshakeError, ValueError):
                line = decode(raw)
                if line.msg is Msg.PID:
                    hs.cell = int(line.fields[0])
