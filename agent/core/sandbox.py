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
from agent.core.grants import NOUSERNS_KEEPABLE

__all__ = ["DEFAULT_MOUNTS", "PROC_MASKED", "PROC_READ_ONLY", "SYS_MASKED", "Mount",
           "MountKind", "MountOp", "SpawnSpec", "UidMap", "check_spec", "exec_paths",
           "plan_mounts", "unshare_flags"]

MountKind = Literal["proc", "tmpfs", "bind", "dev"]

_FLAG_BITS = {"ro": ksys.MS_RDONLY, "nosuid": ksys.MS_NOSUID, "nodev": ksys.MS_NODEV,
              "noexec": ksys.MS_NOEXEC}  # fmt: skip
_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
# The union of what runc, crun, Docker (moby oci/defaults.go), containerd, Podman and
# Kubernetes (DefaultProcMount) hide under /proc, and what they make read-only; every cell
# gets both, with or without a user namespace (docs/sandbox.md, "What a cell's /proc
# hides").  A path the running kernel lacks is skipped.
PROC_MASKED = ("acpi", "asound", "interrupts", "kcore", "keys", "latency_stats",
               "sched_debug", "scsi", "timer_list", "timer_stats")  # fmt: skip
PROC_READ_ONLY = ("bus", "fs", "irq", "sys", "sysrq-trigger")  # host-wide knobs
# Their entries under /sys.  A cell gets no sysfs at all (no mount kind makes one, and
# check_spec refuses any mount at or below /sys), which hides every one of them.
SYS_MASKED = ("firmware", "devices/virtual/powercap", "devices/system/cpu/cpu*/thermal_throttle",
              "dev/block", "fs/selinux")  # fmt: skip
# A masked directory: an empty read-only tmpfs; a masked file: /dev/null, bound read-only
# (it reads as empty; the read-only bind keeps its mode and times from being changed).
_MASK_DIR = ksys.MS_RDONLY | ksys.MS_NOSUID | ksys.MS_NODEV | ksys.MS_NOEXEC
_MASK_DIR_DATA = "mode=0555,size=4096,nr_inodes=1"
_RO_BIND = ksys.MS_BIND | ksys.MS_REMOUNT | ksys.MS_RDONLY | ksys.MS_NOSUID | ksys.MS_NOEXEC
_RESERVED = ("/proc", "/sys", "/dev")  # made by the plan itself: no area may hide them
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
    if_dir: bool | None = None  # optional, and only if the target is (True) / is not a dir

    def __str__(self) -> str:
        cond = {None: "", True: " if dir", False: " if not dir"}[self.if_dir]
        return (f"{self.op} {self.target} src={self.source} fs={self.fstype} "
                f"flags={self.flags:#x}{cond}")


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
            ops += _proc_masks(t)
        elif m.kind == "dev":
            flags = ksys.MS_NOSUID | ksys.MS_NOEXEC
            ops.append(MountOp("mount", t, "tmpfs", "tmpfs", flags, "mode=0755,size=65536"))
            for node in _DEV_NODES:
                ops.append(MountOp("touch", f"{t}/{node}"))
                ops.append(MountOp("mount", f"{t}/{node}", f"/dev/{node}", None, ksys.MS_BIND))
                # read-only: the node stays usable (a device is opened for writing on a
                # read-only mount), its host inode's mode and times cannot be changed
                ops.append(MountOp("mount", f"{t}/{node}", None, None,
                                   ksys.MS_BIND | ksys.MS_REMOUNT | ksys.MS_RDONLY | flags))
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


def _proc_masks(t: str) -> list[MountOp]:
    """Over a fresh procfs at ``t``: read-only binds of PROC_READ_ONLY, then each of
    PROC_MASKED hidden (a directory under an empty read-only tmpfs, a file under
    /dev/null bound read-only); paths this kernel lacks are skipped."""
    ops = []
    for sub in PROC_READ_ONLY:
        ops.append(MountOp("mount", f"{t}/{sub}", f"{t}/{sub}", None,
                           ksys.MS_BIND | ksys.MS_REC, optional=True))  # fmt: skip
        ops.append(MountOp("mount", f"{t}/{sub}", None, None, _RO_BIND | ksys.MS_NODEV,
                           optional=True))  # fmt: skip
    for sub in PROC_MASKED:
        ops.append(MountOp("mount", f"{t}/{sub}", "tmpfs", "tmpfs", _MASK_DIR, _MASK_DIR_DATA,
                           optional=True, if_dir=True))  # fmt: skip
        ops.append(MountOp("mount", f"{t}/{sub}", "/dev/null", None, ksys.MS_BIND,
                           optional=True, if_dir=False))  # fmt: skip
        ops.append(MountOp("mount", f"{t}/{sub}", None, None, _RO_BIND, optional=True,
                           if_dir=False))  # fmt: skip
    return ops


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
        if m.kind in ("tmpfs", "bind") and any(m.target == r or m.target.startswith(r + "/")
                                               for r in _RESERVED):  # fmt: skip
            raise _config(f"mount target {m.target} is at or below /proc, /sys or /dev",
                          "the sandbox makes those itself (masked and read-only parts)")
    try:
        keep = tuple(sorted({ksys.cap_number(c) for c in spec.caps_keep}))
    except KeyError as e:
        raise _config(f"unknown capability {e}", "use names like net_raw") from e
    count = spec.userns.count if spec.userns else 2**32 - 1
    if not (0 <= spec.uid < count and 0 <= spec.gid < count):
        raise _config(f"uid {spec.uid}/gid {spec.gid} not mapped", "keep them below the map count")
    if spec.userns is None:
        _check_without_userns(spec, keep)
    if spec.seccomp is not None and not spec.no_new_privs and ksys.CAPS["sys_admin"] not in keep:
        raise _config("seccomp without no_new_privs needs CAP_SYS_ADMIN", "keep no_new_privs on")
    return keep


def _check_without_userns(spec: SpawnSpec, keep: tuple[int, ...]) -> None:
    """Without a user namespace the cell's ids and capabilities are the host's: the same
    rules as agent.core.grants.without_userns, re-checked on every spawn."""
    if spec.uid == 0 or spec.gid == 0:
        raise _config(f"uid {spec.uid}/gid {spec.gid} without a user namespace: 0 is host root",
                      "run the service as a non-zero uid and gid")
    extra = sorted(set(keep) - NOUSERNS_KEEPABLE)
    if extra:
        names = {n: name for name, n in ksys.CAPS.items()}
        raise _config(f"capabilities {', '.join(names[c] for c in extra)} act on the host "
                      "without a user namespace", "see docs/isolation.md for the set allowed")
    if not spec.no_new_privs:
        raise _config("no_new_privs off without a user namespace", "keep no_new_privs on")


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
