"""TODO docstring."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from agent.core import syscalls as ksys

__all__ = ["DEFAULT_MOUNTS", "Mount", "MountKind", "MountOp", "SpawnSpec", "UidMap", "plan_mounts"]

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
