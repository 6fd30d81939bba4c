"""A wall-clock watch: a ``timerfd`` that the kernel cancels when the clock is set.

:class:`ClockWatch` arms a ``CLOCK_REALTIME`` timer at an absolute time far ahead with
``TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET``: when anything sets the wall clock
(``clock_settime``, ``settimeofday``, ``adjtimex`` with ``ADJ_SETOFFSET``, a leap second,
a resume), the kernel cancels the timer and the fd becomes readable; ``read`` then fails
with ``ECANCELED``.  No polling: the loop sleeps on the fd.  The standard library has no
``timerfd_*`` before Python 3.13, so this calls libc through ctypes.

How far the clock moved is measured against ``CLOCK_BOOTTIME`` (which nothing can set
and which, unlike ``CLOCK_MONOTONIC``, counts time spent suspended): the difference
``realtime - boottime`` before and after.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import time
from collections.abc import Callable

from agent.core.errors import KernelError

__all__ = ["ClockWatch"]

CLOCK_REALTIME = 0
TFD_TIMER_ABSTIME = 1
TFD_TIMER_CANCEL_ON_SET = 2
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
AHEAD_S = 365 * 24 * 3600  # the timer's expiry: re-armed when it is reached
_TIME_MAX = (1 << (8 * ctypes.sizeof(ctypes.c_long) - 1)) - 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_create = _libc.timerfd_create
_create.argtypes = [ctypes.c_int, ctypes.c_int]
_create.restype = ctypes.c_int
_settime = _libc.timerfd_settime
_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                     ctypes.POINTER(_Itimerspec)]
_settime.restype = ctypes.c_int


def _offset() -> float:
    return time.clock_gettime(time.CLOCK_REALTIME) - time.clock_gettime(time.CLOCK_BOOTTIME)


class ClockWatch:
    """A ``timerfd`` to register with the loop; :meth:`check` after each wake-up."""

    def __init__(self, offset: Callable[[], float] = _offset) -> None:
        self._offset = offset
        fd = int(_create(CLOCK_REALTIME, TFD_NONBLOCK | TFD_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            raise KernelError("timerfd_create", "CLOCK_REALTIME", err,
                              "the kernel lacks CONFIG_TIMERFD" if err == errno.ENOSYS
                              else None)
        self.fd = fd
        self.offset = 0.0
        try:
            self.arm()
        except BaseException:
            os.close(fd)
            raise

    def fileno(self) -> int:
        return self.fd

    def arm(self) -> None:
        """Arm (again) at now + :data:`AHEAD_S`, cancelled on a clock set."""
        self.offset = self._offset()
        spec = _Itimerspec()
        spec.it_value.tv_sec = min(int(time.time()) + AHEAD_S, _TIME_MAX)
        if _settime(self.fd, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, ctypes.byref(spec),
                    None) < 0:
            raise KernelError("timerfd_settime", "CLOCK_REALTIME cancel-on-set",
                              ctypes.get_errno())

    def check(self) -> float | None:
        """After a wake-up: how many seconds the wall clock was moved (None if it was
        not: a spurious wake-up, or the timer's own expiry).  Re-arms the timer."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno != errno.ECANCELED:
                raise KernelError.from_oserror("read", "timerfd", exc) from exc
            before = self.offset
            self.arm()
            return self.offset - before
        self.arm()  # reached its expiry (a year of uptime): nothing was set
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
