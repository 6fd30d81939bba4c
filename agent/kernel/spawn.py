"""Start a cell's first process from raw namespaces (no runc, crun or bwrap).

``spawn_cell(spec)`` validates and plans everything in the parent, then forks
once; the child enters the namespaces and forks the cell's pid 1, which builds
the root, drops privileges, installs the seccomp filter and execs.  The
intermediate exits at once, so pid 1 is reparented to agentd (a child
subreaper): no helper process stays per cell.  The steps and why each is safe
are in :func:`_child` and docs/sandbox.md.
"""

from __future__ import annotations

import errno
import gc
import itertools
import logging
import os
import resource
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import NoReturn

from agent.core import syscalls as abi
from agent.core.errors import ConfigError, KernelError
from agent.core.sandbox import _DEFAULT_PATH, _FLAG_BITS, MountOp, SpawnSpec, UidMap, plan_mounts
from agent.kernel import libc as ksys
from agent.kernel import seccomp as sc

__all__ = ["Spawned", "spawn_cell"]

_HINTS = {
    ("mount", errno.ENOENT): "the image must contain the mount point",
    ("mount", errno.EACCES): "with a user namespace, the mapped uid must be able to reach the path",
    ("execve", errno.ENOENT): "is the command in the image (absolute path or PATH)?",
    ("execve", errno.EACCES): "not executable, or on a noexec mount",
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


@dataclass(frozen=True)
class _Plan:
    """Everything the child needs, computed before fork."""

    spec: SpawnSpec
    root: str
    mounts: tuple[MountOp, ...]
    unshare_flags: int
    drop_caps: tuple[int, ...]
    keep_mask: int
    keep_caps: tuple[int, ...]
    rlimits: tuple[tuple[int, int, int], ...]
    exec_paths: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


def _config(msg: str, hint: str) -> ConfigError:
    return ConfigError("E_SPAWN", msg, hint)


def _plan(spec: SpawnSpec) -> _Plan:
    if not spec.argv:
        raise _config("empty argv", "give the command to run")
    root = os.path.realpath(spec.rootfs)
    if not os.path.isdir(root) or root == "/":
        raise KernelError("stat", spec.rootfs, errno.ENOTDIR, "rootfs must be an image directory")
    for m in spec.mounts:
        if not m.target.startswith("/") or ".." in m.target.split("/") or m.target == "/":
            raise _config(f"mount target {m.target!r} must be absolute, below / and without ..",
                          "write it as /tmp or /var/lib/x")  # fmt: skip
        if (m.kind == "bind") != (m.source is not None) or not m.flags <= set(_FLAG_BITS):
            raise _config(f"mount {m.target}: bad source or flags", "source only for bind")
    try:
        keep = tuple(sorted({abi.cap_number(c) for c in spec.caps_keep}))
        limits = tuple((getattr(resource, "RLIMIT_" + n.upper()), s, h) for n, s, h in spec.rlimits)
    except (KeyError, AttributeError) as e:
        raise _config(f"unknown capability or rlimit {e}", "use names like net_raw, nofile") from e
    count = spec.userns.count if spec.userns else 2**32 - 1
    if not (0 <= spec.uid < count and 0 <= spec.gid < count):
        raise _config(f"uid {spec.uid}/gid {spec.gid} not mapped", "keep them below the map count")
    if spec.seccomp is not None and not spec.no_new_privs and abi.CAPS["sys_admin"] not in keep:
        raise _config("seccomp without no_new_privs needs CAP_SYS_ADMIN", "keep no_new_privs on")
    env = dict(spec.env)
    if "/" in spec.argv[0]:
        paths: tuple[str, ...] = (spec.argv[0],)
    else:
        dirs = env.get("PATH", _DEFAULT_PATH).split(":")
        paths = tuple(f"{d.rstrip('/')}/{spec.argv[0]}" for d in dirs if d.startswith("/"))
    flags = (abi.CLONE_NEWNS | abi.CLONE_NEWPID | abi.CLONE_NEWUTS | abi.CLONE_NEWIPC
             | (0 if spec.cgroup_path else abi.CLONE_NEWCGROUP)  # see _child
             | (0 if spec.netns_path else abi.CLONE_NEWNET))  # fmt: skip
    mask = sum(1 << c for c in keep)
    last = ksys.cap_last_cap()
    return _Plan(spec, root, plan_mounts(root, spec.mounts, spec.uid, spec.gid,
                                         os.statvfs(root).f_flag),
                 flags, tuple(c for c in range(last + 1) if c not in keep), mask, keep,
                 limits, paths, env)  # fmt: skip


def _high(fd: int) -> int:
    """Move ``fd`` to >= 3 so dup2 onto 0-2 in the child cannot clobber it."""
    import fcntl

    if fd >= 3:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return new


def _report(fd: int, op: str, target: str, err: int) -> None:
    clean = target.replace("\t", " ").replace("\n", " ")
    os.write(fd, f"F\t{op}\t{clean}\t{err}\n".encode())


def _mark(fd: int, step: str) -> None:
    """Trace point (AGENT_SPAWN_TRACE): ``T<tab>step<tab>monotonic ns`` on the status pipe."""
    os.write(fd, f"T\t{step}\t{time.monotonic_ns()}\n".encode())


def _run_mount(op: MountOp) -> None:
    if op.optional and not os.path.lexists(op.target):
        return
    if op.target != "/" and os.path.realpath(op.target) != op.target:
        # a symlink in the image must not redirect a mount outside the new root
        raise KernelError("resolve", op.target, errno.ELOOP, "mount points must be real dirs")
    if op.op == "mkdir":
        os.makedirs(op.target, 0o755, exist_ok=True)
    elif op.op == "touch":
        os.close(os.open(op.target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666))
    elif op.op == "symlink":
        os.symlink(op.source or "", op.target)
    else:
        ksys.mount(op.source, op.target, op.fstype, op.flags, op.data)


def _child(p: _Plan, status: int, sync: int, sock: socket.socket, parent: int) -> NoReturn:
    """Runs between fork and execve; never returns.

    Only raw syscalls (ctypes), os.* wrappers and small allocations happen
    here: the child is single-threaded, and every error is reported to the
    parent as (step, target, errno) over the CLOEXEC status pipe, then we
    _exit(127) so no Python cleanup (atexit, buffered files) runs twice.
    """
    s = p.spec
    step, target = "start", ""
    try:
        if _TRACE:
            _mark(status, "forked")
        # -- stage 1: intermediate, still in the host pid namespace --------------
        # Die with agentd: a half-made cell must not outlive its creator.
        step = "prctl(PR_SET_PDEATHSIG)"
        ksys.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(127)
        # Drop agentd's supplementary groups while still host root (setgroups is
        # denied inside the user namespace below).
        step = "setgroups"
        os.setgroups([])
        # Join the agent-made netns *before* the user namespace exists: the netns
        # stays owned by the host user ns, so cell root cannot touch its firewall.
        if s.netns_path:
            step, target = "setns(net)", s.netns_path
            nsfd = os.open(s.netns_path, os.O_RDONLY | os.O_CLOEXEC)
            ksys.setns(nsfd, abi.CLONE_NEWNET, s.netns_path)
            os.close(nsfd)
        if s.userns:
            # The parent (host root) writes uid_map/gid_map; we wait for it.
            step, target = "unshare(user)", ""
            ksys.unshare(abi.CLONE_NEWUSER)
            os.write(status, b"U\n")
            if os.read(sync, 1) != b"1":
                os._exit(127)
            step = "setresuid(0)"
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        if _TRACE:
            _mark(status, "joined netns, userns")
        # New namespaces, owned by the cell's user namespace if there is one.
        step, target = "unshare", hex(p.unshare_flags)
        ksys.unshare(p.unshare_flags)
        step, target = "fork", ""
        pid = os.fork()
        if pid:
            # The intermediate reports pid 1's host pid and leaves: pid 1 is
            # reparented to agentd (child subreaper).
            os.write(status, f"P\t{pid}\n".encode())
            os._exit(0)
        # -- stage 2: pid 1 of the new pid namespace ------------------------------
        os.setsid()
        if _TRACE:
            _mark(status, "unshared, pid 1 forked")
        # Mounts: / becomes rslave first, so nothing below propagates to the host.
        for op in p.mounts:
            step, target = f"{op.op}({op.fstype or 'bind'})", op.target
            _run_mount(op)
        # pivot_root(".", "."): the old root lands on top of "." and is detached
        # at once; the read-only image needs no put_old directory.
        if _TRACE:
            _mark(status, "mounts")
        step, target = "pivot_root", p.root
        os.chdir(p.root)
        ksys.pivot_root(".", ".")
        ksys.umount2(".", abi.MNT_DETACH)
        os.chdir("/")
        step, target = "sethostname", s.hostname
        ksys.sethostname(s.hostname)
        # The cell's cgroup, as late as possible: the setup above is agentd's work and
        # must not run under the cell's cpu.max (a 20% quota made it 5x slower).  The
        # parent (host root) moves us; then the cgroup namespace is unshared, so the
        # cell's view of the cgroup tree starts at its own leaf.  Nothing of the
        # cell's own has run yet.
        if s.cgroup_path:
            step, target = "join cgroup", s.cgroup_path
            os.write(status, b"C\n")
            if os.read(sync, 1) != b"1":
                os._exit(127)
            step, target = "unshare(cgroup)", s.cgroup_path
            ksys.unshare(abi.CLONE_NEWCGROUP)
        # rlimits before dropping CAP_SYS_RESOURCE (raising a hard limit needs it).
        for res, soft, hard in p.rlimits:
            step, target = "setrlimit", str(res)
            resource.setrlimit(res, (soft, hard))
        # Capabilities: the bounding set loses everything not kept (needs
        # CAP_SETPCAP, so first), ambient is cleared, then ids and the sets.
        step, target = "capbset_drop", ""
        for cap in p.drop_caps:
            ksys.capbset_drop(cap)
        ksys.clear_ambient()
        if s.uid != 0:
            ksys.set_keepcaps(True)
        step, target = "setresuid", f"{s.uid}:{s.gid}"
        os.setresgid(s.gid, s.gid, s.gid)
        os.setresuid(s.uid, s.uid, s.uid)
        step, target = "capset", hex(p.keep_mask)
        ksys.capset(p.keep_mask, p.keep_mask, p.keep_mask)
        if s.uid != 0:  # a non-root service keeps its caps across execve via ambient
            for cap in p.keep_caps:
                ksys.raise_ambient(cap)
            ksys.set_keepcaps(False)
        if _TRACE:
            _mark(status, "pivot_root, hostname, rlimits, caps")
        step, target = "chdir", s.cwd
        os.chdir(s.cwd)
        if s.no_new_privs:
            step = "prctl(PR_SET_NO_NEW_PRIVS)"
            ksys.set_no_new_privs()
        # stdio: move the sources out of 0-2 first, then dup2 (clears CLOEXEC).
        step, target = "dup2", "stdio"
        wanted = (s.stdin, s.stdout, s.stderr)
        null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC) if None in wanted else -1
        srcs = [os.dup(null if fd is None else fd) for fd in wanted]
        for i, src in enumerate(srcs):
            os.dup2(src, i)
        ksys.close_range_cloexec(3)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; exec keeps that
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        # The filter goes last: from here on every syscall is filtered, and the
        # few left (sendmsg, close, write, execve) are allowed by every policy.
        if _TRACE:
            _mark(status, "no_new_privs, stdio, signals")
        if s.seccomp is not None:
            step, target = "seccomp", "filter"
            lfd = sc.install_filter(s.seccomp, new_listener=True)
            assert lfd is not None
            socket.send_fds(sock, [b"S"], [lfd])
            os.close(lfd)
        if _TRACE:
            _mark(status, "seccomp")
        os.write(status, b"X\n")
        err = errno.ENOENT
        for path in p.exec_paths:
            step, target = "execve", path
            try:
                os.execve(path, list(s.argv), p.env)
            except OSError as e:
                if e.errno != errno.ENOENT or err == errno.ENOENT:
                    err = e.errno or errno.EIO
        _report(status, "execve", s.argv[0], err)
    except KernelError as e:
        _report(status, e.op, e.target, e.errno)
    except OSError as e:
        _report(status, step, e.filename if isinstance(e.filename, str) else target,
                e.errno or errno.EIO)  # fmt: skip
    except BaseException:
        _report(status, step, target, errno.EIO)
    finally:
        os._exit(127)


def _join_cgroup(path: str, pid: int) -> None:
    procs = f"{path}/cgroup.procs"
    try:
        fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise KernelError.from_oserror("write", procs, e, "does the cell's cgroup exist?") from None


def _write_maps(pid: int, m: UidMap) -> None:
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {m.base} {m.count}\n"),
                       ("gid_map", f"0 {m.base} {m.count}\n")):
        path = f"/proc/{pid}/{name}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as e:
            raise KernelError.from_oserror("write", path, e, "is the uid range free?") from None


def _reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def spawn_cell(spec: SpawnSpec) -> Spawned:
    """Create the namespaces and exec the cell's first process; see module doc.

    Raises ConfigError for a bad spec and KernelError naming the failed step;
    on failure every process created here is killed and reaped (the mounts
    lived in the cell's own mount namespace and vanish with it)."""
    plan = _plan(spec)
    ksys.set_child_subreaper(True)
    status_r, status_w = (_high(fd) for fd in os.pipe2(os.O_CLOEXEC))
    sync_r, sync_w = (_high(fd) for fd in os.pipe2(os.O_CLOEXEC))
    psock, csock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sk in (psock, csock):
        if sk.fileno() < 3:
            sk.close()
            raise KernelError("socketpair", "fd", errno.EBADF, "agentd must keep fds 0-2 open")
    parent = os.getpid()
    t_fork = time.monotonic_ns()
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
        os.close(status_r)
        os.close(sync_w)
        psock.close()
        _child(plan, status_w, sync_r, csock, parent)
    os.close(status_w)
    os.close(sync_r)
    csock.close()
    cell: int | None = None
    pidfd: int | None = None
    listener: int | None = None
    inter_alive = True
    trace: list[tuple[str, int]] = [("fork", t_fork)]
    join_pending = False

    def _move(pid: int) -> None:
        assert spec.cgroup_path is not None
        try:
            _join_cgroup(spec.cgroup_path, pid)
        except KernelError:
            os.write(sync_w, b"0")
            raise
        os.write(sync_w, b"1")

    try:
        failure: tuple[str, str, int] | None = None
        deadline = time.monotonic() + spec.timeout
        buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([status_r], [], [], left)[0]:
                raise KernelError("spawn", spec.argv[0], errno.ETIMEDOUT, "the child hung")
            chunk = os.read(status_r, 4096)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                kind, *rest = line.decode(errors="replace").split("\t")
                if kind == "U" and spec.userns:
                    try:
                        _write_maps(inter, spec.userns)
                    except KernelError:
                        os.write(sync_w, b"0")
                        raise
                    os.write(sync_w, b"1")
                elif kind == "P":
                    cell = int(rest[0])
                    pidfd = ksys.pidfd_open(cell)  # cell is our (grand)child: pid cannot recycle
                    if join_pending:
                        join_pending = False
                        _move(cell)
                elif kind == "C" and spec.cgroup_path:
                    if cell is None:  # pid 1 asked before the intermediate said who it is
                        join_pending = True
                    else:
                        _move(cell)
                elif kind == "F" and failure is None:
                    failure = (rest[0], rest[1], int(rest[2]))
                elif kind == "T" and len(rest) == 2:
                    trace.append((rest[0], int(rest[1])))
        os.waitpid(inter, 0)
        inter_alive = False
        if len(trace) > 1:
            trace.append(("exec", time.monotonic_ns()))
            log.info("spawn %s: %s", spec.hostname, " ".join(
                f"{step}+{(ts - prev) / 1e6:.1f}ms"
                for (_, prev), (step, ts) in itertools.pairwise(trace)))
        if failure:
            op, target, err = failure
            hint = _HINTS.get((op.split("(")[0], err))
            raise KernelError(op, target, err, hint)
        if cell is None or pidfd is None:
            raise KernelError("fork", spec.argv[0], errno.ECHILD, "intermediate died early")
        if spec.seccomp is not None:
            psock.setblocking(False)
            _msg, fds, _fl, _addr = socket.recv_fds(psock, 1, 1)
            if not fds:
                raise KernelError("recvmsg", "seccomp listener", errno.EBADMSG)
            listener = fds[0]
            os.set_blocking(listener, False)
        return Spawned(cell, pidfd, listener)
    except BaseException:
        if inter_alive:
            _reap(inter)
        if cell is not None:
            _reap(cell)
        for fd in (pidfd, listener):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        os.close(status_r)
        os.close(sync_w)
        psock.close()
