"""fanotify (thin kernel adapter): a group, its mount marks, its events and the answers.

:class:`Group` is one ``fanotify_init`` instance through ctypes (the standard library has
no wrapper).  A *permission* group (``FAN_CLASS_CONTENT``) is told of every
``FAN_OPEN_EXEC_PERM`` on the mounts it marks and must answer each one with
:meth:`Group.respond` (``FAN_ALLOW`` or ``FAN_DENY``): until then the exec'ing thread
waits in the kernel.  A *notification* group (``FAN_CLASS_NOTIF``, ``FAN_OPEN_EXEC``)
hears of execs after the fact: what is left on a kernel without
``CONFIG_FANOTIFY_ACCESS_PERMISSIONS``.  Every event carries an fd of the very file
opened (``O_RDONLY``, close-on-exec, opened without raising events of its own) and the
host pid of the process.

Queues: a permission group is made with ``FAN_UNLIMITED_QUEUE``.  With a bounded queue
the kernel *allows* a permission event it has no room for (fail open); unbounded, the
queue holds at most one event per waiting thread, which the cells' ``pids.max`` bound.
A notification group keeps the kernel's bound (``max_queued_events``) and reports
``FAN_Q_OVERFLOW`` when it overflows.

Marks are mount marks (``FAN_MARK_MOUNT``): only opens through that very mount are seen,
so a cell's marks see the cell and nothing of the host.  :meth:`Group.mark_mount` takes
a path or an fd (``O_PATH`` is fine: the mark is made through ``/proc/self/fd/N``).
Nothing here decides; :mod:`agent.monitor.exec` does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from agent.core.errors import KernelError

__all__ = [
    "FAN_ALLOW",
    "FAN_CLOSE_WRITE",
    "FAN_DENY",
    "FAN_OPEN_EXEC",
    "FAN_OPEN_EXEC_PERM",
    "FAN_Q_OVERFLOW",
    "FanEvent",
    "Group",
    "parse_events",
    "permission_events",
]

# <linux/fanotify.h>
FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_CLASS_NOTIF = 0x00
FAN_CLASS_CONTENT = 0x04
FAN_UNLIMITED_QUEUE = 0x10
FAN_MARK_ADD = 0x01
FAN_MARK_REMOVE = 0x02
FAN_MARK_MOUNT = 0x10
FAN_MARK_IGNORED_MASK = 0x20
FAN_MARK_FLUSH = 0x80
FAN_CLOSE_WRITE = 0x00000008
FAN_OPEN_EXEC = 0x00001000
FAN_Q_OVERFLOW = 0x00004000
FAN_OPEN_EXEC_PERM = 0x00040000
FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_NOFD = -1
_METADATA_VERSION = 3
_META = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_RESPONSE = struct.Struct("=iI")  # fd, response
_READ_SIZE = 4096  # 170 events: one read per loop callback
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]

_HINTS = {
    errno.EMFILE: "root's fanotify groups are used up (one per cell): raise "
                  "/proc/sys/fs/fanotify/max_user_groups",
    errno.ENOSPC: "root's fanotify marks are used up: raise /proc/sys/fs/fanotify/max_user_marks",
    errno.EPERM: "fanotify needs CAP_SYS_ADMIN",
    errno.EINVAL: "the kernel has no fanotify permission events "
                  "(CONFIG_FANOTIFY_ACCESS_PERMISSIONS): exec checks are report-only",
    errno.ENOSYS: "the kernel has no fanotify (CONFIG_FANOTIFY)",
}


@dataclass(frozen=True)
class FanEvent:
    mask: int
    fd: int  # the file, or FAN_NOFD (an overflow)
    pid: int  # host pid (tgid) of the process

    @property
    def permission(self) -> bool:
        return bool(self.mask & FAN_OPEN_EXEC_PERM)

    @property
    def overflow(self) -> bool:
        return bool(self.mask & FAN_Q_OVERFLOW)

    @property
    def written(self) -> bool:
        """A file opened for writing was closed (marks made with ``writes``)."""
        return bool(self.mask & FAN_CLOSE_WRITE)

    @property
    def exec(self) -> bool:
        return bool(self.mask & (FAN_OPEN_EXEC | FAN_OPEN_EXEC_PERM))


def parse_events(buf: bytes) -> list[FanEvent]:
    """The events in one ``read`` of a fanotify fd (the kernel never splits one)."""
    out: list[FanEvent] = []
    off = 0
    while off + _META.size <= len(buf):
        length, vers, _r, mlen, mask, fd, pid = _META.unpack_from(buf, off)
        if vers != _METADATA_VERSION or length < _META.size or mlen < _META.size \
                or off + length > len(buf):
            raise ValueError(f"fanotify event at {off}: version {vers}, length {length}")
        out.append(FanEvent(mask, fd, pid))
        off += length
    if off != len(buf):
        raise ValueError(f"{len(buf) - off} stray bytes after the fanotify events")
    return out


def _mark_target(path: str | int) -> bytes:
    return os.fsencode(f"/proc/self/fd/{path}" if isinstance(path, int) else path)


class Group:
    """One fanotify group (see the module doc).  Not thread-safe, except that marks may
    be added from any thread; close it once."""

    def __init__(self, fd: int, permission: bool) -> None:
        self._fd = fd
        self.permission = permission
        self.mask = FAN_OPEN_EXEC_PERM if permission else FAN_OPEN_EXEC

    @classmethod
    def open(cls, permission: bool) -> Group:
        """A new group: permission events (unbounded queue) or notifications."""
        flags = FAN_CLOEXEC | FAN_NONBLOCK | (
            FAN_CLASS_CONTENT | FAN_UNLIMITED_QUEUE if permission else FAN_CLASS_NOTIF)
        fd = _libc.fanotify_init(flags, os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise KernelError("fanotify_init", "permission" if permission else "notification",
                              err, _HINTS.get(err))
        return cls(int(fd), permission)

    @classmethod
    def adopt(cls, fd: int, permission: bool) -> Group:
        """A group handed over by the previous master: its marks and queue are intact."""
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        return cls(fd, permission)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the fanotify group is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def mark_mount(self, path: str | int, what: str = "", writes: bool = False,
                   execs: bool = True) -> None:
        """Watch every open for exec through the mount of ``path`` (a path, or an open
        fd, ``O_PATH`` included); with ``writes``, also every close of a file written
        through it (``FAN_CLOSE_WRITE``, a notification); ``execs=False``: only that.
        Marking a mount twice changes nothing."""
        target = _mark_target(path)
        mask = (self.mask if execs else 0) | (FAN_CLOSE_WRITE if writes else 0)
        if _libc.fanotify_mark(self.fileno(), FAN_MARK_ADD | FAN_MARK_MOUNT, mask,
                               _AT_FDCWD, target) < 0:
            err = ctypes.get_errno()
            raise KernelError("fanotify_mark", what or os.fsdecode(target), err,
                              _HINTS.get(err))

    def ignore(self, fd: int) -> None:
        """Stop asking about the file of ``fd`` (an ignored mask on its inode) until it
        is next written to: the kernel clears such a mask on a modification, through
        any mount."""
        if _libc.fanotify_mark(self.fileno(), FAN_MARK_ADD | FAN_MARK_IGNORED_MASK,
                               self.mask, _AT_FDCWD, _mark_target(fd)) < 0:
            err = ctypes.get_errno()
            raise KernelError("fanotify_mark", "ignore", err, _HINTS.get(err))

    def unignore(self, fd: int) -> None:
        """Ask about the file of ``fd`` again (its ignored mask removed)."""
        if _libc.fanotify_mark(self.fileno(), FAN_MARK_REMOVE | FAN_MARK_IGNORED_MASK,
                               self.mask, _AT_FDCWD, _mark_target(fd)) < 0:
            err = ctypes.get_errno()
            if err != errno.ENOENT:
                raise KernelError("fanotify_mark", "unignore", err, _HINTS.get(err))

    def forget(self) -> None:
        """Ask again about every file: all inode marks (the ignored masks) flushed; the
        mount marks stay."""
        if _libc.fanotify_mark(self.fileno(), FAN_MARK_FLUSH, 0, _AT_FDCWD, None) < 0:
            raise KernelError("fanotify_mark", "flush", ctypes.get_errno())

    def read(self) -> list[FanEvent]:
        """The events queued now (an empty list when there are none)."""
        try:
            buf = os.read(self.fileno(), _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            raise KernelError.from_oserror("read", "fanotify group", exc) from None
        return parse_events(buf)

    def respond(self, fd: int, allow: bool) -> bool:
        """Answer the permission event of ``fd`` (the caller closes ``fd`` after);
        False when the kernel no longer waits for it (ENOENT: already answered)."""
        try:
            os.write(self.fileno(), _RESPONSE.pack(fd, FAN_ALLOW if allow else FAN_DENY))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise KernelError.from_oserror("write", "fanotify response", exc) from None
        return True

    def close(self) -> None:
        """Close the group: its marks go, and the kernel allows what still waits."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def permission_events() -> bool | None:
    """Whether the running kernel delivers fanotify permission events: True, False (no
    CONFIG_FANOTIFY_ACCESS_PERMISSIONS, or no fanotify at all), None (cannot tell: not
    privileged).  Asked with a throw-away group and an inode mark on ``/``."""
    fd = _libc.fanotify_init(FAN_CLOEXEC | FAN_CLASS_CONTENT, os.O_RDONLY | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        return None if err == errno.EPERM else False
    try:
        ok = _libc.fanotify_mark(fd, FAN_MARK_ADD, FAN_OPEN_EXEC_PERM, _AT_FDCWD, b"/") == 0
        return ok or (None if ctypes.get_errno() == errno.EPERM else False)
    finally:
        os.close(fd)
