"""What a cell's sandbox is made of, planned purely: the spawn spec, its checks, the
mount steps that turn an image into the cell's root, the namespaces to unshare.

:func:`check_spec` refuses a bad :class:`SpawnSpec` before anything is forked;
:func:`plan_mounts` orders the mounts (docs/sandbox.md explains each);
:mod:`agent.kernel.spawn` carries both out, and :mod:`agent.core.handshake` is how
its child talks to agentd while it does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from agent.core import syscalls as ksys
from agent.core.errors import ConfigError

__all__ = ["DEFAULT_MOUNTS", "Mount", "MountKind", "MountOp", "SpawnSpec", "UidMap",
           "check_spec", "exec_paths", "plan_mounts", "unshare_flags"]

MountKind = Literal["proc", "tmpfs", "bind", "dev"]

_FLAG_BITS = {"ro": ksys.MS_RDONLY, "nosuid": ksys.MS_NOSUID, "nodev": ksys.MS_NODEV,
              "noexec": ksys.MS_NOEXEC}  # fmt: skip
_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
_PROC_RO = ("sys", "sysrq-trigger", "irq", "bus", "fs")  # host-wide knobs under /proc
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Mount:
    kind: MountKind
    target: str  # absolute path inside the cell
    size: int | None = None  # bytes, tmpfs only (default 16 MiB)
    flags: frozenset[str] = frozenset({"nosuid", "nodev", "noexec"})
    source: str | None = None  # host path, bind only
    mode: int = 0o755
    optional: bool = False  # bind only: skipped if the image has no such mount point


DEFAULT_MOUNTS = (Mount("proc", "/proc"), Mount("dev", "/dev"))


@dataclass(frozen=True)
class UidMap:
    """Inside uid/gid 0..count-1 is outside base..base+count-1."""

    base: int
    count: int = 65536


@dataclass(frozen=True)
class SpawnSpec:
    argv: tuple[str, ...]
    rootfs: str  # read-only image directory
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = "/"
    hostname: str = "cell"
    mounts: tuple[Mount, ...] = DEFAULT_MOUNTS
    userns: UidMap | None = None  # None: no user namespace, cell root is root with dropped caps
    netns_path: str | None = None  # None: a fresh empty network namespace
    cgroup_path: str | None = None
    caps_keep: frozenset[str] = frozenset()
    rlimits: tuple[tuple[str, int, int], ...] = ()  # ("nofile", soft, hard)
    no_new_privs: bool = True
    seccomp: bytes | None = None  # pack(compile_filter(...))
    stdin: int | None = None  # None: /dev/null
    stdout: int | None = None
    stderr: int | None = None
    uid: int = 0  # inside the cell
    gid: int = 0
    timeout: float = 10.0


@dataclass(frozen=True)
class MountOp:
    """One planned step of building the root; ``target`` is a host path."""

    op: Literal["mount", "mkdir", "touch", "symlink"]
    target: str
    source: str | None = None
    fstype: str | None = None
    flags: int = 0
    data: str | None = None
    optional: bool = False  # skipped if the target does not exist

    def __str__(self) -> str:
        return f"{self.op} {self.target} src={self.source} fs={self.fstype} flags={self.flags:#x}"


_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
# statvfs f_flag bits (<sys/statvfs.h>)
_ST_NOATIME, _ST_NODIRATIME, _ST_RELATIME = 1024, 2048, 4096


def _bits(flags: frozenset[str]) -> int:
    out = 0
    for f in flags:
        out |= _FLAG_BITS[f]
    return out


def _atime_flags(statvfs_flags: int) -> int:
    # keep what a bind remount in a user namespace may not change (locked atime flags)
    return ((_MS_NOATIME if statvfs_flags & _ST_NOATIME else 0)
            | (_MS_NODIRATIME if statvfs_flags & _ST_NODIRATIME else 0)
            | (_MS_RELATIME if statvfs_flags & _ST_RELATIME else 0))  # fmt: skip


def plan_mounts(root: str, mounts: Sequence[Mount], uid: int, gid: int,
                root_statvfs_flags: int) -> tuple[MountOp, ...]:  # fmt: skip
    """The ordered mount steps that turn ``root`` into the cell's root (pure)."""
    ops = [MountOp("mount", "/", flags=ksys.MS_REC | ksys.MS_SLAVE),
           MountOp("mount", root, source=root, flags=ksys.MS_BIND)]  # fmt: skip
    ownership = f"uid={uid},gid={gid}"
    tmp_targets: list[str] = []
    for m in mounts:
        t = root + m.target.rstrip("/")
        if any(t.startswith(p + "/") for p in tmp_targets):  # inside a tmpfs we made: mkdir
            ops.append(MountOp("mkdir", t))
        if m.kind == "proc":
            ops.append(MountOp("mount", t, "proc", "proc", _bits(frozenset(_FLAG_BITS) - {"ro"})))
            for sub in _PROC_RO:
                ops.append(MountOp("mount", f"{t}/{sub}", f"{t}/{sub}", None,
                                   ksys.MS_BIND | ksys.MS_REC, optional=True))  # fmt: skip
                ops.append(MountOp("mount", f"{t}/{sub}", None, None, ksys.MS_BIND
                                   | ksys.MS_REMOUNT | ksys.MS_RDONLY | ksys.MS_NOSUID
                                   | ksys.MS_NODEV | ksys.MS_NOEXEC, optional=True))  # fmt: skip
        elif m.kind == "dev":
            flags = ksys.MS_NOSUID | ksys.MS_NOEXEC
            ops.append(MountOp("mount", t, "tmpfs", "tmpfs", flags, "mode=0755,size=65536"))
            for node in _DEV_NODES:
                ops.append(MountOp("touch", f"{t}/{node}"))
                ops.append(MountOp("mount", f"{t}/{node}", f"/dev/{node}", None, ksys.MS_BIND))
                ops.append(MountOp("mount", f"{t}/{node}", None, None,
                                   ksys.MS_BIND | ksys.MS_REMOUNT | flags))  # fmt: skip
            for name, dest in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                               ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
                ops.append(MountOp("symlink", f"{t}/{name}", dest))
            ops.append(MountOp("mkdir", f"{t}/shm"))
            ops.append(MountOp("mount", f"{t}/shm", "tmpfs", "tmpfs",
                               flags | ksys.MS_NODEV, f"mode=1777,size=1048576,{ownership}"))
            ops.append(MountOp("mount", t, None, None,
                               ksys.MS_BIND | ksys.MS_REMOUNT | ksys.MS_RDONLY | flags))
            tmp_targets.append(t)
        elif m.kind == "tmpfs":
            flags = ksys.MS_NOSUID | ksys.MS_NODEV | _bits(m.flags & {"noexec", "ro"})
            size = m.size if m.size is not None else 16 << 20
            ops.append(MountOp("mount", t, "tmpfs", "tmpfs", flags,
                               f"mode={m.mode:o},size={size},{ownership}"))  # fmt: skip
            tmp_targets.append(t)
        else:  # bind: only nosuid/nodev/ro/noexec may be added, never removed
            ops.append(MountOp("mount", t, m.source, None, ksys.MS_BIND, optional=m.optional))
            ops.append(MountOp("mount", t, None, None, ksys.MS_BIND | ksys.MS_REMOUNT
                               | ksys.MS_NOSUID | ksys.MS_NODEV | _bits(m.flags),
                               optional=m.optional))  # fmt: skip
    ops.append(MountOp("mount", root, None, None, ksys.MS_BIND | ksys.MS_REMOUNT | ksys.MS_RDONLY
                       | ksys.MS_NOSUID | ksys.MS_NODEV | _atime_flags(root_statvfs_flags)))
    return tuple(ops)


def _config(msg: str, hint: str) -> ConfigError:
    return ConfigError("E_SPAWN", msg, hint)


def check_spec(spec: SpawnSpec) -> tuple[int, ...]:
    """Refuse a spec that cannot be carried out safely (ConfigError ``E_SPAWN``); return
    the capability numbers to keep."""
    if not spec.argv:
        raise _config("empty argv", "give the command to run")
    for m in spec.mounts:
        if not m.target.startswith("/") or ".." in m.target.split("/") or m.target == "/":
            raise _config(f"mount target {m.target!r} must be absolute, below / and without ..",
                          "write it as /tmp or /var/lib/x")
        if (m.kind == "bind") != (m.source is not None) or not m.flags <= set(_FLAG_BITS):
            raise _config(f"mount {m.target}: bad source or flags", "source only for bind")
    try:
        keep = tuple(sorted({ksys.cap_number(c) for c in spec.caps_keep}))
    except KeyError as e:
        raise _config(f"unknown capability {e}", "use names like net_raw") from e
    count = spec.userns.count if spec.userns else 2**32 - 1
    if not (0 <= spec.uid < count and 0 <= spec.gid < count):
        raise _config(f"uid {spec.uid}/gid {spec.gid} not mapped", "keep them below the map count")
    if spec.seccomp is not None and not spec.no_new_privs and ksys.CAPS["sys_admin"] not in keep:
        raise _config("seccomp without no_new_privs needs CAP_SYS_ADMIN", "keep no_new_privs on")
    return keep


def exec_paths(argv0: str, env: dict[str, str]) -> tuple[str, ...]:
    """Where execve looks for the command: the path itself, or each absolute ``PATH`` dir."""
    if "/" in argv0:
        return (argv0,)
    dirs = env.get("PATH", _DEFAULT_PATH).split(":")
    return tuple(f"{d.rstrip('/')}/{argv0}" for d in dirs if d.startswith("/"))


def unshare_flags(spec: SpawnSpec) -> int:
    """The namespaces the child unshares after joining the agent's netns and the user ns.
    The cgroup namespace is unshared later, once pid 1 is in its cgroup (its view then
    starts at its own leaf); an agent-made netns is joined, not unshared."""
    return (ksys.CLONE_NEWNS | ksys.CLONE_NEWPID | ksys.CLONE_NEWUTS | ksys.CLONE_NEWIPC
            | (0 if spec.cgroup_path else ksys.CLONE_NEWCGROUP)
            | (0 if spec.netns_path else ksys.CLONE_NEWNET))
