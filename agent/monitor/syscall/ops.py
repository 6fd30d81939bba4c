"""The privileged operations a cell may be granted, as the master decides them (pure).

A trapped call is answered in two steps, so that no pointer of the cell is ever
followed twice (the TOCTOU race of seccomp_unotify(2)):

1. :func:`plan` looks at the scalar arguments only: it refuses what no operation allows
   (an op not granted, a clock that is not CLOCK_REALTIME, reboot's magic, mount flags)
   or says which memory to copy out of the cell (:class:`Need`);
2. :func:`decide` looks at those copies only and returns a :class:`Decision`: refused
   with an errno and a reason, or allowed with the :data:`Action` the master performs
   itself.  The call is never continued in the cell.

The kernel never sees the cell's pointers: the master's own call gets the copies.
"""

from __future__ import annotations

import errno
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from agent.monitor.syscall.rules import Trapped

__all__ = [
    "ADJ_MODES",
    "FSTYPES",
    "MIN_CLOCK_S",
    "TIMEX_SIZE",
    "Action",
    "AdjTime",
    "Decision",
    "MountUsb",
    "Need",
    "Reboot",
    "Refused",
    "SetClock",
    "SetHostname",
    "Umount",
    "decide",
    "map_id",
    "plan",
]

TIMEX_SIZE = 208  # struct timex on 64-bit Linux
ADJ_MODES = 0xF1BF  # ADJ_OFFSET ... ADJ_TICK, ADJ_OFFSET_SINGLESHOT, ADJ_OFFSET_SS_READ
MIN_CLOCK_S, MAX_CLOCK_S = 1577836800, 7258118400  # 2020-01-01 .. 2200-01-01
HOST_NAME_MAX = 64
PATH_MAX = 4096
CLOCK_REALTIME = 0
_MAGIC1 = 0xFEE1DEAD
_MAGIC2 = frozenset({672274793, 85072278, 369367448, 537993216})
_REBOOT = {0x01234567: "restart", 0x4321FEDC: "poweroff", 0xCDEF0123: "halt"}
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*"
                       r"[A-Za-z0-9])?)*")  # fmt: skip

# mount(2) flags a USB mount may carry; nosuid, nodev and noexec are always added
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_DIRSYNC, MS_NOSYMFOLLOW, MS_NOATIME, MS_NODIRATIME, MS_SILENT = 128, 256, 1024, 2048, 32768
MS_RELATIME, MS_STRICTATIME, MS_LAZYTIME = 1 << 21, 1 << 24, 1 << 25
MS_MGC_VAL, MS_MGC_MSK = 0xC0ED0000, 0xFFFF0000
_MS_OK = (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_SYNCHRONOUS | MS_DIRSYNC
          | MS_NOSYMFOLLOW | MS_NOATIME | MS_NODIRATIME | MS_SILENT | MS_RELATIME
          | MS_STRICTATIME | MS_LAZYTIME)  # fmt: skip
# the new mount API's attributes (MOUNT_ATTR_*)
ATTR_RDONLY, ATTR_NOSUID, ATTR_NODEV, ATTR_NOEXEC = 0x1, 0x2, 0x4, 0x8
ATTR_NOATIME, ATTR_STRICTATIME, ATTR_NODIRATIME, ATTR_NOSYMFOLLOW = 0x10, 0x20, 0x80, 0x200000
MNT_FORCE, MNT_DETACH, MNT_EXPIRE, UMOUNT_NOFOLLOW = 1, 2, 4, 8

# File systems a USB partition may hold, and the options each may be mounted with (no
# errors=panic: a bad stick must not take the box down).
_FAT_OPTS = frozenset({"uid", "gid", "umask", "fmask", "dmask", "iocharset", "utf8",
                       "errors", "discard"})  # fmt: skip
FSTYPES: dict[str, frozenset[str]] = {
    "vfat": _FAT_OPTS | {"codepage", "shortname", "tz", "time_offset", "flush"},
    "exfat": _FAT_OPTS | {"time_offset"},
    "ntfs3": _FAT_OPTS | {"nohidden", "sys_immutable", "hide_dot_files"},
    "ext4": frozenset({"errors", "discard", "nodiscard", "noload"}),
}
_VALUE = re.compile(r"[A-Za-z0-9_.:+-]{1,32}")
_DEVICE = re.compile(r"/dev/(sd[a-z]{1,2}[0-9]{0,3})")


class Refused(Exception):
    """An operation refused while the master performs it: ``err`` is the cell's errno."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.err = err
        self.reason = reason


@dataclass(frozen=True)
class Need:
    """Copy ``size`` bytes at argument ``arg`` (a string: up to ``size``, to its NUL)."""

    arg: int
    size: int
    string: bool = False


@dataclass(frozen=True)
class SetHostname:
    name: str
    domain: bool = False  # setdomainname


@dataclass(frozen=True)
class SetClock:
    ns: int  # CLOCK_REALTIME in nanoseconds


@dataclass(frozen=True)
class AdjTime:
    timex: bytes  # the cell's struct timex; the result goes back to argument ``arg``
    arg: int


@dataclass(frozen=True)
class Reboot:
    how: str  # restart, poweroff, halt


@dataclass(frozen=True)
class MountUsb:
    device: str  # kernel name, e.g. sda1 (the adapter checks it is on a USB bus)
    target: str  # absolute, resolved inside the cell's root
    fstype: str
    attrs: int  # MOUNT_ATTR_*: always nosuid, nodev, noexec
    sb_flags: tuple[str, ...]  # fsconfig flags: ro, sync, dirsync, lazytime
    options: tuple[tuple[str, str | None], ...]  # without uid/gid
    uid: int | None  # in the cell; None: the caller's
    gid: int | None


@dataclass(frozen=True)
class Umount:
    target: str
    flags: int


Action = SetHostname | SetClock | AdjTime | Reboot | MountUsb | Umount


@dataclass(frozen=True)
class Decision:
    verdict: str  # allowed, denied
    error: int = 0  # errno for the cell; 0 with an action: the action's result decides
    reason: str | None = None
    action: Action | None = None

    @classmethod
    def no(cls, error: int, reason: str) -> Decision:
        return cls("denied", error, reason)


def plan(t: Trapped, granted: frozenset[str]) -> Decision | tuple[Need, ...]:
    """Refuse from the scalar arguments, or name the memory to copy (``()``: none)."""
    if t.op not in granted:
        return Decision.no(errno.EPERM, "operation not granted" if t.op != "none"
                           else "no operation allows it")  # fmt: skip
    n = t.name
    if n in ("sethostname", "setdomainname"):
        size = t.arg(1, signed=True)
        if not 0 <= size <= HOST_NAME_MAX:
            return Decision.no(errno.EINVAL, "name longer than 64 bytes")
        return (Need(0, size),)
    if n == "clock_settime":
        if t.arg(0, signed=True) != CLOCK_REALTIME:
            return Decision.no(errno.EINVAL, "only CLOCK_REALTIME")
        return (Need(1, 16),)
    if n == "settimeofday":
        if t.args[1]:
            return Decision.no(errno.EPERM, "the kernel time zone is not settable")
        return (Need(0, 16),) if t.args[0] else Decision("allowed")
    if n in ("adjtimex", "clock_adjtime"):
        if n == "clock_adjtime" and t.arg(0, signed=True) != CLOCK_REALTIME:
            return Decision.no(errno.EINVAL, "only CLOCK_REALTIME")
        return (Need(0 if n == "adjtimex" else 1, TIMEX_SIZE),)
    if n == "reboot":
        return _reboot(t)
    if n == "mount":
        flags = t.args[3] & 0xFFFFFFFF
        if flags & MS_MGC_MSK == MS_MGC_VAL:
            flags &= ~MS_MGC_MSK
        if flags & ~_MS_OK:
            return Decision.no(errno.EPERM, "only a new mount of a USB partition "
                               f"(flags {flags & ~_MS_OK:#x} refused)")  # fmt: skip
        needs = [Need(0, 64, True), Need(1, PATH_MAX, True), Need(2, 16, True)]
        return (*needs, Need(4, 512, True)) if t.args[4] else tuple(needs)
    if n == "umount2":
        if t.arg(1) & ~(MNT_FORCE | MNT_DETACH | UMOUNT_NOFOLLOW):
            return Decision.no(errno.EINVAL, "umount flags")
        return (Need(0, PATH_MAX, True),)
    return Decision.no(errno.EPERM, "no operation allows it")


def _reboot(t: Trapped) -> Decision:
    if t.arg(0) != _MAGIC1 or t.arg(1) not in _MAGIC2:
        return Decision.no(errno.EINVAL, "bad reboot magic")
    how = _REBOOT.get(t.arg(2))
    if how is None:
        return Decision.no(errno.EPERM, f"reboot command {t.arg(2):#x} refused")
    return Decision("allowed", action=Reboot(how))


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


def decide(t: Trapped, mem: Mapping[int, bytes]) -> Decision:
    """The verdict from the copies ``mem`` (argument index -> bytes) that :func:`plan`
    asked for.  A string is copied without its NUL."""
    n = t.name
    if n in ("sethostname", "setdomainname"):
        name = _text(mem[0])
        if name is None or not _HOSTNAME.fullmatch(name):
            return Decision.no(errno.EINVAL, "not a host name (RFC 1123)")
        return Decision("allowed", action=SetHostname(name, n == "setdomainname"))
    if n in ("clock_settime", "settimeofday"):
        sec, frac = struct.unpack("<qq", mem[1 if n == "clock_settime" else 0])
        scale = 1 if n == "clock_settime" else 1000
        if not 0 <= frac * scale < 10**9:
            return Decision.no(errno.EINVAL, "bad fraction of a second")
        if not MIN_CLOCK_S <= sec < MAX_CLOCK_S:
            return Decision.no(errno.EINVAL, "time outside 2020..2200")
        return Decision("allowed", action=SetClock(sec * 10**9 + frac * scale))
    if n in ("adjtimex", "clock_adjtime"):
        arg = 0 if n == "adjtimex" else 1
        (modes,) = struct.unpack_from("<I", mem[arg])
        if modes & ~ADJ_MODES:
            return Decision.no(errno.EINVAL, f"adjtimex modes {modes & ~ADJ_MODES:#x}")
        return Decision("allowed", action=AdjTime(mem[arg], arg))
    if n == "mount":
        return _mount(t, mem)
    if n == "umount2":
        target = _text(mem[0])
        if not target or not target.startswith("/"):
            return Decision.no(errno.EINVAL, "target must be an absolute path")
        return Decision("allowed", action=Umount(target, t.arg(1)))
    return Decision.no(errno.EPERM, "no operation allows it")


def _mount(t: Trapped, mem: Mapping[int, bytes]) -> Decision:
    source, target, fstype = (_text(mem[i]) for i in (0, 1, 2))
    m = _DEVICE.fullmatch(source or "")
    if m is None:
        return Decision.no(errno.EPERM, "source is not a /dev/sdXN partition")
    if not target or not target.startswith("/"):
        return Decision.no(errno.EINVAL, "target must be an absolute path")
    if fstype not in FSTYPES:
        return Decision.no(errno.EPERM, f"file system {fstype!r} not among {sorted(FSTYPES)}")
    flags = t.args[3] & 0xFFFFFFFF
    attrs = ATTR_NOSUID | ATTR_NODEV | ATTR_NOEXEC
    for ms, attr in ((MS_RDONLY, ATTR_RDONLY), (MS_NOATIME, ATTR_NOATIME),
                     (MS_STRICTATIME, ATTR_STRICTATIME), (MS_NODIRATIME, ATTR_NODIRATIME),
                     (MS_NOSYMFOLLOW, ATTR_NOSYMFOLLOW)):  # fmt: skip
        if flags & ms:
            attrs |= attr
    sb = tuple(name for ms, name in ((MS_RDONLY, "ro"), (MS_SYNCHRONOUS, "sync"),
                                     (MS_DIRSYNC, "dirsync"), (MS_LAZYTIME, "lazytime"))
               if flags & ms)  # fmt: skip
    data = _text(mem[4]) if 4 in mem else ""
    if data is None:
        return Decision.no(errno.EINVAL, "mount options are not ASCII")
    options: list[tuple[str, str | None]] = []
    ids: dict[str, int | None] = {"uid": None, "gid": None}
    for item in filter(None, data.split(",")):
        key, eq, value = item.partition("=")
        if key not in FSTYPES[fstype] or (eq and not _VALUE.fullmatch(value)):
            return Decision.no(errno.EPERM, f"mount option {key!r} refused for {fstype}")
        if key == "errors" and value not in ("continue", "remount-ro"):
            return Decision.no(errno.EPERM, "errors= must be continue or remount-ro")
        if key in ids:
            if not value.isdigit() or int(value) >= 1 << 32:
                return Decision.no(errno.EINVAL, f"{key}= takes a number")
            ids[key] = int(value)
        else:
            options.append((key, value if eq else None))
    return Decision("allowed", action=MountUsb(m.group(1), target, fstype, attrs, sb,
                                               tuple(options), ids["uid"], ids["gid"]))


def map_id(inside: int, map_text: str) -> int | None:
    """The host id of ``inside`` through a ``uid_map``/``gid_map`` (lines of ``inside
    outside count``); None when the map does not cover it."""
    for line in map_text.splitlines():
        parts = line.split()
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            continue
        first, outside, count = (int(p) for p in parts)
        if first <= inside < first + count:
            return outside + inside - first
    return None
