"""seccomp user notification, the kernel half of channel 2 (trap and decide): install a
compiled filter with a listener fd (``SECCOMP_FILTER_FLAG_NEW_LISTENER``), receive a
trapped syscall's notification, check that its id is still valid, and send the master's
verdict.  The filter itself is compiled by pure code in :mod:`agent.core.seccomp`.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import functools
import select
import struct
from dataclasses import dataclass

from agent.core import syscalls as abi
from agent.core.errors import KernelError
from agent.kernel import libc as ksys

__all__ = [
    "Notif",
    "Verdict",
    "id_valid",
    "install_filter",
    "listener_dead",
    "notif_sizes",
    "recv_notif",
    "send_resp",
]

_SET_MODE_FILTER = 1


_GET_NOTIF_SIZES = 3


_FLAG_NEW_LISTENER = 1 << 3


_FLAG_CONTINUE = 1


_IOCTL_RECV = 0xC0502100  # _IOWR('!', 0, struct seccomp_notif)      (80 bytes)


_IOCTL_SEND = 0xC0182101  # _IOWR('!', 1, struct seccomp_notif_resp) (24 bytes)


_IOCTL_ID_VALID = 0x40082102  # _IOW('!', 2, __u64)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_filter(prog: bytes, new_listener: bool = True) -> int | None:
    """Install ``prog`` on the calling thread; return the listener fd if asked for.

    Needs no_new_privs or CAP_SYS_ADMIN in the caller's user namespace."""
    if not prog or len(prog) % 8:
        raise KernelError("seccomp", "filter", errno.EINVAL, "pass pack(compile_filter(...))")
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.addressof(buf))
    flags = _FLAG_NEW_LISTENER if new_listener else 0
    fd = ksys.seccomp(_SET_MODE_FILTER, flags, ctypes.addressof(fprog), "seccomp(SET_MODE_FILTER)")
    return fd if new_listener else None


@functools.cache
def notif_sizes() -> tuple[int, int, int]:
    """(seccomp_notif, seccomp_notif_resp, seccomp_data) sizes of the running kernel
    (asked once: they do not change while it runs)."""
    sizes = (ctypes.c_uint16 * 3)()
    ksys.seccomp(_GET_NOTIF_SIZES, 0, ctypes.addressof(sizes), "seccomp(GET_NOTIF_SIZES)")
    return sizes[0], sizes[1], sizes[2]


@dataclass(frozen=True)
class Notif:
    id: int
    pid: int  # in the listener's pid namespace
    flags: int
    nr: int
    arch: int
    ip: int
    args: tuple[int, ...]

    def syscall(self) -> str:
        """The call's name in its ABI (``i386_11`` for one the tables do not hold)."""
        return abi.describe_call(self.arch, self.nr)


class Verdict(enum.Enum):
    SENT = "sent"
    GONE = "gone"  # the process died or the call was interrupted: not an error


def recv_notif(fd: int) -> Notif | None:
    """Read one notification; call when ``fd`` is readable (it blocks otherwise).

    Returns None when the notifying process went away before we read it."""
    size = max(notif_sizes()[0], 80)
    buf = bytearray(size)
    try:
        fcntl.ioctl(fd, _IOCTL_RECV, buf, True)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EINTR):
            return None
        raise KernelError.from_oserror("ioctl(SECCOMP_IOCTL_NOTIF_RECV)", f"fd {fd}", e) from None
    nid, pid, flags, nr, arch, ip, *args = struct.unpack_from("=QIIiIQ6Q", buf)
    return Notif(nid, pid, flags, nr, arch, ip, tuple(args))


def send_resp(fd: int, nid: int, *, error: int = 0, val: int = 0, cont: bool = False) -> Verdict:
    """Answer notification ``nid``: ``error`` is a positive errno (0 = success with
    ``val``); ``cont`` lets the kernel run the syscall as the cell would have."""
    if cont and (error or val):
        raise ValueError("CONTINUE takes neither error nor val")
    buf = bytearray(struct.pack("=QqiI", nid, val, -error, _FLAG_CONTINUE if cont else 0))
    try:
        fcntl.ioctl(fd, _IOCTL_SEND, buf, True)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return Verdict.GONE
        raise KernelError.from_oserror("ioctl(SECCOMP_IOCTL_NOTIF_SEND)", f"fd {fd}", e) from None
    return Verdict.SENT


def listener_dead(fd: int) -> bool:
    """True once every process under the filter is gone (POLLHUP, nothing to read):
    the caller should unregister and close ``fd``."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    events = dict(poller.poll(0)).get(fd, 0)
    return bool(events & select.POLLHUP) and not events & select.POLLIN


def id_valid(fd: int, nid: int) -> bool:
    """Is notification ``nid`` still pending (its process alive and waiting)?"""
    try:
        fcntl.ioctl(fd, _IOCTL_ID_VALID, bytearray(struct.pack("=Q", nid)), True)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        op = "ioctl(SECCOMP_IOCTL_NOTIF_ID_VALID)"
        raise KernelError.from_oserror(op, f"fd {fd}", e) from None
    return True
