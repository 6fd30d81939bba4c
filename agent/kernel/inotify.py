"""inotify (thin kernel adapter): wake the event loop when files land in a directory.

:class:`Inotify` is one ``inotify_init1(IN_NONBLOCK | IN_CLOEXEC)`` instance through
ctypes (the standard library has no wrapper); its :meth:`~Inotify.fileno` is what the
loop waits on (``loop.add_reader``), and :meth:`~Inotify.read` returns the events the
kernel has queued, parsed (:func:`parse_events`), or none when there are none.  It
decides nothing: the caller says what to watch and what an event means.

Watching a drop directory (the correlation service's update directory):

* ``IN_CLOSE_WRITE``: a file opened for writing was closed (written in place);
* ``IN_MOVED_TO``: a file was renamed into the directory (the usual "write a temporary
  file, then rename" of an updater);
* ``IN_Q_OVERFLOW`` (always reported, wd -1): the kernel's queue overflowed and events
  were lost: rescan the directory;
* ``IN_IGNORED``: the watch is gone (the directory was removed or unmounted).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from agent.core.errors import KernelError

__all__ = [
    "IN_ATTRIB",
    "IN_CLOSE_WRITE",
    "IN_CREATE",
    "IN_DELETE",
    "IN_DELETE_SELF",
    "IN_IGNORED",
    "IN_ISDIR",
    "IN_MOVED_FROM",
    "IN_MOVED_TO",
    "IN_MOVE_SELF",
    "IN_ONLYDIR",
    "IN_Q_OVERFLOW",
    "Inotify",
    "InotifyEvent",
    "parse_events",
]

# <linux/inotify.h>
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
_READ_SIZE = 64 << 10  # many events per read; one event is at most 16 + NAME_MAX + 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]

_HINTS = {
    errno.EMFILE: "the user's inotify instances are used up: raise "
                  "/proc/sys/fs/inotify/max_user_instances",
    errno.ENOSPC: "the user's inotify watches are used up: raise "
                  "/proc/sys/fs/inotify/max_user_watches",
    errno.ENOENT: "the directory does not exist: create it first",
    errno.ENOTDIR: "the path is not a directory",
}


@dataclass(frozen=True)
class InotifyEvent:
    wd: int  # the watch (-1 for IN_Q_OVERFLOW)
    mask: int
    cookie: int  # pairs IN_MOVED_FROM with IN_MOVED_TO
    name: str  # the file's name in the watched directory ("" for the directory itself)

    @property
    def overflow(self) -> bool:
        return bool(self.mask & IN_Q_OVERFLOW)


def parse_events(buf: bytes) -> list[InotifyEvent]:
    """The events in one ``read`` of an inotify fd (the kernel never splits one)."""
    out: list[InotifyEvent] = []
    off = 0
    while off + _HEADER.size <= len(buf):
        wd, mask, cookie, n = _HEADER.unpack_from(buf, off)
        off += _HEADER.size
        if off + n > len(buf):
            raise ValueError(f"inotify event at {off - _HEADER.size} runs past the buffer")
        raw = buf[off:off + n].split(b"\0", 1)[0]  # NUL-padded to alignment
        off += n
        out.append(InotifyEvent(wd, mask, cookie, os.fsdecode(raw)))
    if off != len(buf):
        raise ValueError(f"{len(buf) - off} stray bytes after the inotify events")
    return out


class Inotify:
    """One inotify instance (see the module doc).  Not thread-safe; close it once."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise KernelError("inotify_init1", "IN_NONBLOCK|IN_CLOEXEC", err, _HINTS.get(err))
        self._fd = int(fd)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the inotify instance is closed")
        return self._fd

    def add_watch(self, path: Path | str, mask: int) -> int:
        """Watch ``path`` for the events in ``mask``; the watch descriptor."""
        wd = _libc.inotify_add_watch(self.fileno(), os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise KernelError("inotify_add_watch", str(path), err, _HINTS.get(err))
        return int(wd)

    def rm_watch(self, wd: int) -> None:
        """Stop watch ``wd``; one already gone (its directory removed) is not an error."""
        if _libc.inotify_rm_watch(self.fileno(), wd) < 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:
                raise KernelError("inotify_rm_watch", f"wd {wd}", err)

    def read(self) -> list[InotifyEvent]:
        """The events queued now (an empty list when there are none)."""
        try:
            buf = os.read(self.fileno(), _READ_SIZE)
        except BlockingIOError:
            return []
        except InterruptedError:
            return []
        except OSError as exc:
            raise KernelError.from_oserror("read", "inotify fd", exc) from None
        return parse_events(buf)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
