"""The set-up child of a cell: what runs between agentd's fork and the service's execve.

:func:`run` never returns.  Its steps, in order, and why each is safe where it is:

1. :func:`_enter` (the intermediate, still in the host's pid namespace): die with agentd,
   drop agentd's groups, join the agent-made netns *before* the user namespace exists
   (so the netns stays owned by the host and cell root cannot touch its firewall),
   unshare the user namespace and wait for agentd to write its maps (``USERNS``), unshare
   the other namespaces, fork pid 1, report its host pid (``PID``) and exit;
2. :func:`_build_root` (pid 1): the planned mounts, pivot_root, the hostname, then its
   cgroup as late as possible (``CGROUP``: agentd moves it; set-up must not run under
   the cell's cpu.max) and the cgroup namespace;
3. :func:`_drop_privileges`: rlimits (before CAP_SYS_RESOURCE goes), the bounding set,
   ids, the kept capabilities (ambient for a non-root service);
4. :func:`_prepare_exec`: cwd, no_new_privs, stdio, every other fd close-on-exec,
   default signal dispositions;
5. :func:`_install_filter`: the seccomp filter last (every later syscall is filtered;
   the few left are allowed by every policy), its listener sent to agentd;
6. ``EXEC`` and execve along the planned paths.

Only raw syscalls (ctypes), os.* wrappers and small allocations happen here: the child
is single-threaded, and every error is reported as (step, target, errno) in a
``FAILED`` message (:mod:`agent.core.handshake`), then ``_exit(127)`` so no Python
clean-up runs twice.  AGENT_SPAWN_TRACE adds a ``TRACE`` timestamp per step.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import NoReturn

from agent.core import syscalls as abi
from agent.core.errors import KernelError
from agent.core.handshake import SYNC_OK, Msg, encode
from agent.core.sandbox import MountOp, SpawnSpec
from agent.kernel import libc
from agent.kernel import seccomp as notify

__all__ = ["ChildPlan", "run"]


@dataclass(frozen=True)
class ChildPlan:
    """Everything the child needs, computed by agentd before fork."""

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
    trace: bool = False


class _Where:
    """The step in progress and what it touches, for the FAILED report."""

    def __init__(self) -> None:
        self.step, self.target = "start", ""

    def __call__(self, step: str, target: str = "") -> None:
        self.step, self.target = step, target


class _Link:
    """The child's ends of the status and sync pipes."""

    def __init__(self, status: int, sync: int, trace: bool) -> None:
        self.status, self.sync, self.trace = status, sync, trace

    def send(self, msg: Msg, *fields: object) -> None:
        os.write(self.status, encode(msg, *fields))

    def ask(self, msg: Msg) -> None:
        """Send ``msg`` and wait for agentd's go-ahead; anything else ends the child."""
        self.send(msg)
        if os.read(self.sync, 1) != SYNC_OK:
            os._exit(127)

    def mark(self, step: str) -> None:
        if self.trace:
            self.send(Msg.TRACE, step, time.monotonic_ns())


def _enter(p: ChildPlan, link: _Link, at: _Where, parent: int) -> None:
    """Stage 1, in the intermediate; returns in pid 1 (the intermediate exits here)."""
    s = p.spec
    at("prctl(PR_SET_PDEATHSIG)")
    libc.set_pdeathsig(signal.SIGKILL)  # a half-made cell must not outlive agentd
    if os.getppid() != parent:
        os._exit(127)
    at("setgroups")
    os.setgroups([])  # still host root: denied inside the user namespace below
    if s.netns_path:
        at("setns(net)", s.netns_path)
        nsfd = os.open(s.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        libc.setns(nsfd, abi.CLONE_NEWNET, s.netns_path)
        os.close(nsfd)
    if s.userns:
        at("unshare(user)")
        libc.unshare(abi.CLONE_NEWUSER)
        link.ask(Msg.USERNS)  # agentd (host root) writes uid_map/gid_map
        at("setresuid(0)")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    link.mark("joined netns, userns")
    at("unshare", hex(p.unshare_flags))
    libc.unshare(p.unshare_flags)  # owned by the cell's user namespace if there is one
    at("fork")
    pid = os.fork()
    if pid:  # pid 1 is reparented to agentd (a child subreaper): no helper stays
        link.send(Msg.PID, pid)
        os._exit(0)
    os.setsid()
    link.mark("unshared, pid 1 forked")


def _run_mount(op: MountOp) -> None:
    if op.optional and not os.path.lexists(op.target):
        return  # e.g. a /proc entry this kernel lacks
    if op.if_dir is not None and stat.S_ISDIR(os.lstat(op.target).st_mode) != op.if_dir:
        return  # the plan's other alternative applies (a masked dir or a masked file)
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
        libc.mount(op.source, op.target, op.fstype, op.flags, op.data)


def _build_root(p: ChildPlan, link: _Link, at: _Where) -> None:
    """Stage 2, pid 1: the root (/ is made rslave first: nothing propagates to the host),
    pivot_root(".", ".") (the old root lands on "." and is detached at once: the
    read-only image needs no put_old), the hostname, the cgroup."""
    s = p.spec
    for op in p.mounts:
        at(f"{op.op}({op.fstype or 'bind'})", op.target)
        _run_mount(op)
    link.mark("mounts")
    at("pivot_root", p.root)
    os.chdir(p.root)
    libc.pivot_root(".", ".")
    libc.umount2(".", abi.MNT_DETACH)
    os.chdir("/")
    at("sethostname", s.hostname)
    libc.sethostname(s.hostname)
    if s.cgroup_path:  # nothing of the cell's own has run yet
        at("join cgroup", s.cgroup_path)
        link.ask(Msg.CGROUP)
        at("unshare(cgroup)", s.cgroup_path)
        libc.unshare(abi.CLONE_NEWCGROUP)


def _drop_privileges(p: ChildPlan, at: _Where) -> None:
    s = p.spec
    for res, soft, hard in p.rlimits:  # before CAP_SYS_RESOURCE goes (hard limits)
        at("setrlimit", str(res))
        resource.setrlimit(res, (soft, hard))
    at("capbset_drop")  # needs CAP_SETPCAP, so first
    for cap in p.drop_caps:
        libc.capbset_drop(cap)
    libc.clear_ambient()
    if s.uid != 0:
        libc.set_keepcaps(True)
    at("setresuid", f"{s.uid}:{s.gid}")
    os.setresgid(s.gid, s.gid, s.gid)
    os.setresuid(s.uid, s.uid, s.uid)
    at("capset", hex(p.keep_mask))
    libc.capset(p.keep_mask, p.keep_mask, p.keep_mask)
    if s.uid != 0:  # a non-root service keeps its caps across execve via ambient
        for cap in p.keep_caps:
            libc.raise_ambient(cap)
        libc.set_keepcaps(False)


def _prepare_exec(p: ChildPlan, at: _Where) -> None:
    s = p.spec
    at("chdir", s.cwd)
    os.chdir(s.cwd)
    if s.no_new_privs:
        at("prctl(PR_SET_NO_NEW_PRIVS)")
        libc.set_no_new_privs()
    at("dup2", "stdio")  # move the sources out of 0-2 first, then dup2 (clears CLOEXEC)
    wanted = (s.stdin, s.stdout, s.stderr)
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC) if None in wanted else -1
    srcs = [os.dup(null if fd is None else fd) for fd in wanted]
    for i, src in enumerate(srcs):
        os.dup2(src, i)
    libc.close_range_cloexec(3)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; exec keeps that
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _install_filter(p: ChildPlan, sock: socket.socket, at: _Where) -> None:
    if p.spec.seccomp is None:
        return
    at("seccomp", "filter")
    lfd = notify.install_filter(p.spec.seccomp, new_listener=True)
    assert lfd is not None
    socket.send_fds(sock, [b"S"], [lfd])
    os.close(lfd)


def _exec(p: ChildPlan, link: _Link, at: _Where) -> None:
    """execve along the planned paths; returns only if every one failed (then the most
    telling errno is reported: not ENOENT when some path existed)."""
    link.send(Msg.EXEC)
    err = errno.ENOENT
    for path in p.exec_paths:
        at("execve", path)
        try:
            os.execve(path, list(p.spec.argv), p.env)
        except OSError as e:
            if e.errno != errno.ENOENT or err == errno.ENOENT:
                err = e.errno or errno.EIO
    link.send(Msg.FAILED, "execve", p.spec.argv[0], err)


def run(p: ChildPlan, status: int, sync: int, sock: socket.socket, parent: int) -> NoReturn:
    """The child's whole life (see the module docstring); never returns."""
    link, at = _Link(status, sync, p.trace), _Where()
    try:
        link.mark("forked")
        _enter(p, link, at, parent)
        _build_root(p, link, at)
        _drop_privileges(p, at)
        link.mark("pivot_root, hostname, rlimits, caps")
        _prepare_exec(p, at)
        link.mark("no_new_privs, stdio, signals")
        _install_filter(p, sock, at)
        link.mark("seccomp")
        _exec(p, link, at)
    except KernelError as e:
        link.send(Msg.FAILED, e.op, e.target, e.errno)
    except OSError as e:
        link.send(Msg.FAILED, at.step, e.filename if isinstance(e.filename, str) else at.target,
                  e.errno or errno.EIO)
    except BaseException:
        link.send(Msg.FAILED, at.step, at.target, errno.EIO)
    finally:
        os._exit(127)
