"""Channel 1's kernel side: mark a cell's mounts, look at the file being executed and the
process executing it, read seals and the signature file, watch the file for changes.

**Marks.** A cell's mounts live in its own mount namespace.  :func:`mark_cell` reads the
mount table of the cell's pid 1 (``/proc/PID/mountinfo``: every mount it can reach from
its root, as paths from that root) and marks each mount through a handle on the cell's
root: ``openat2(root, mount point, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`` resolves the
path as if chrooted there (a symlink the cell planted cannot lead out to a host mount),
and the mark is made through the ``O_PATH`` handle (``/proc/self/fd/N``), so the path is
never walked twice.  The marks are mount marks: they see the cell's opens and no one
else's, however many cells share the image's file system.

**The file.** :func:`facts` takes the fd fanotify handed over (the very file the kernel is
about to execute): ``fstat`` (cache key, size, mode, file system) and its path as the
cell sees it (the kernel's ``d_path``, from the cell's root, for a mount of another
namespace).  The hash is :func:`agent.kernel.seal.hash_fd` of that fd.

**The process.** :func:`identity`: its pid in the cell's pid namespace and its name, from
``/proc/PID/status`` (read only for what is reported).

A minimal inotify (:class:`DirWatch`) wakes the service when the signature file changes
(``agent/kernel/inotify.py`` was not in main yet: switch to it once it is).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from agent.core.errors import KernelError
from agent.core.seal import Seal, SealError
from agent.kernel.fanotify import Group

__all__ = ["DirWatch", "Facts", "SealCache", "alive", "facts", "identity", "mark_cell",
           "mount_points", "open_in_root", "read_bounded"]

_NR_OPENAT2 = 437  # the same on x86_64 and aarch64 (the shared table since 5.1)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def open_in_root(root_fd: int, path: str) -> int:
    """An ``O_PATH`` handle on ``path`` resolved inside the directory ``root_fd`` as if it
    were ``/`` (``..`` and absolute symlinks stay inside; no magic links); the last
    component is not followed."""
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW, 0,
                   _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(ctypes.c_long(_NR_OPENAT2), ctypes.c_long(root_fd),
                       ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                       ctypes.c_long(ctypes.sizeof(how)))
    if fd < 0:
        raise KernelError("openat2(RESOLVE_IN_ROOT)", path, ctypes.get_errno())
    return int(fd)


def _unescape(field: str) -> str:
    """A mountinfo path field: the kernel writes space, tab, newline and backslash as
    ``\\ooo`` octal escapes."""
    if "\\" not in field:
        return field
    out, i = bytearray(), 0
    raw = field.encode("utf-8", "surrogateescape")
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and all(0x30 <= c <= 0x37
                                                         for c in raw[i + 1:i + 4]):
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def mount_points(mountinfo: str) -> list[str]:
    """The mount points in a ``/proc/PID/mountinfo`` text where a file may be executed,
    in its order (parents first), each once.  A ``noexec`` mount is left out: the kernel
    refuses an exec there before any fanotify event (and refuses permission marks on
    procfs).  A path mounted over twice counts as its top mount, the one reachable."""
    out: dict[str, bool] = {}
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) < 6:
            raise ValueError(f"mountinfo line has {len(fields)} fields: {line[:80]!r}")
        out[_unescape(fields[4])] = "noexec" not in fields[5].split(",")
    return [mp for mp, exec_ok in out.items() if exec_ok]


def mark_cell(group: Group, pid: int, proc: Path = Path("/proc"),
              writes: frozenset[str] = frozenset()) -> list[str]:
    """Mark every mount the process ``pid`` can reach from its root and may execute from
    (see the module doc and :func:`mount_points`); the mount points marked.  A mount
    point that no longer resolves (hidden under a later mount) is skipped: nothing can be
    executed through it by path either.  The mount points in ``writes`` (the cell's data
    dirs) are also watched for files written (closed after writing)."""
    root = os.open(proc / str(pid) / "root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            text = (proc / str(pid) / "mountinfo").read_text()
        except OSError as exc:
            raise KernelError.from_oserror("read", f"{proc}/{pid}/mountinfo", exc) from None
        marked: list[str] = []
        for mp in mount_points(text):
            if mp == "/":
                group.mark_mount(root, f"/ of pid {pid}")
                marked.append(mp)
            elif _mark_under(group, root, mp, f"{mp} of pid {pid}", mp in writes, True):
                marked.append(mp)
        for mp in sorted(writes - set(marked)):  # a data dir mounted noexec: writes only
            _mark_under(group, root, mp, f"{mp} of pid {pid}", True, False)
        return marked
    finally:
        os.close(root)


def _mark_under(group: Group, root: int, mp: str, what: str, writes: bool,
                execs: bool) -> bool:
    """Mark the mount at ``mp`` under ``root``; False if that path no longer resolves."""
    try:
        fd = open_in_root(root, mp)
    except KernelError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise
    try:
        group.mark_mount(fd, what, writes=writes, execs=execs)
    finally:
        os.close(fd)
    return True


@dataclass(frozen=True)
class Facts:
    """What ``fstat`` and ``d_path`` say of the file being executed."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int  # permission bits
    regular: bool

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """The hash cache's key: a write changes size or times; ctime cannot be set back."""
        return (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns)


def facts(fd: int) -> Facts:
    st = os.fstat(fd)
    path = os.readlink(f"/proc/self/fd/{fd}")
    return Facts(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                 stat.S_IMODE(st.st_mode), stat.S_ISREG(st.st_mode))


def identity(hpid: int, proc: Path = Path("/proc")) -> tuple[int | None, str | None]:
    """(pid in its own pid namespace, name) of host pid ``hpid``; None where unknown."""
    try:
        text = (proc / str(hpid) / "status").read_text()
    except OSError:
        return None, None
    pid: int | None = None
    comm: str | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Name":
            comm = value.strip()
        elif key == "NSpid" and value.split():
            pid = int(value.split()[-1])
    return pid, comm


def alive(hpid: int, proc: Path = Path("/proc")) -> bool:
    """Whether host pid ``hpid`` exists and is not a zombie (which has left its cgroup)."""
    try:
        stat_text = (proc / str(hpid) / "stat").read_text()
    except OSError:
        return False
    return stat_text[stat_text.rfind(")") + 2:][:1] not in ("Z", "X", "")


def read_bounded(path: Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``path`` (the caller refuses a file that long)."""
    with open(path, "rb") as f:
        return f.read(limit + 1)


class SealCache:
    """Parsed seals by path, re-read when the file changes (any thread)."""

    def __init__(self) -> None:
        self._seals: dict[str, tuple[tuple[int, int, int, int], Seal]] = {}

    def load(self, path: str) -> Seal | None:
        """The seal at ``path``; None when there is none.  SealError when it is bad."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KernelError.from_oserror("open", path, exc) from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            got = self._seals.get(path)
            if got is not None and got[0] == key:
                return got[1]
            try:
                text = f.read().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SealError(path, f"not UTF-8 text (byte {exc.start})") from None
        seal = Seal.parse(text, path)
        self._seals[path] = (key, seal)
        return seal


# -- a minimal inotify (see the module doc) ------------------------------------------------

IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
_IN_HEADER = struct.Struct("iIII")
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class DirWatch:
    """One inotify instance watching one directory: ``read`` returns (mask, name) of the
    events queued (name "" for the directory itself or an overflow)."""

    MASK = IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE

    def __init__(self, directory: Path) -> None:
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise KernelError("inotify_init1", str(directory), ctypes.get_errno())
        self._fd = int(fd)
        if _libc.inotify_add_watch(self._fd, os.fsencode(directory), self.MASK) < 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise KernelError("inotify_add_watch", str(directory), err)

    def fileno(self) -> int:
        return self._fd

    def read(self) -> list[tuple[int, str]]:
        try:
            buf = os.read(self._fd, 65536)
        except (BlockingIOError, InterruptedError):
            return []
        out, off = [], 0
        while off + _IN_HEADER.size <= len(buf):
            _wd, mask, _cookie, n = _IN_HEADER.unpack_from(buf, off)
            off += _IN_HEADER.size
            out.append((mask, os.fsdecode(buf[off:off + n].split(b"\0", 1)[0])))
            off += n
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
