"""Who signalled agentd: signals it never expects, read from a ``signalfd`` with their
sender's pid and uid.

A process that may signal agentd (root, or agentd's own uid) can only be seen through
the kernel's ``siginfo``: Python's handlers do not pass it on.  :class:`SignalWatch`
blocks the watched signals in the calling thread (so in every thread started after
it, and across a respawn's exec) and opens a ``signalfd`` for them; the loop reads it.
The signals are those agentd has no use for and whose default action would kill or
stop it (:data:`UNEXPECTED`): a stray ``kill -USR1`` no longer ends the master, and
each one is reported.  SIGTERM and SIGINT stay with the loop's handlers (the init
script's orderly stop); SIGHUP is watched (agentd has no reload); SIGKILL and SIGSTOP
cannot be caught by anyone.

A cell never inherits the mask: the spawn child unblocks every signal before it execs
(agent.kernel.spawnchild).  agentd's short helpers (nft, mkfs, reboot) and its listener
keeper do inherit it (Python's subprocess does not reset a mask): none of them relies on
these signals.
The standard library has no ``signalfd`` (Python 3.11), so this calls libc through
ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import struct
from dataclasses import dataclass

from agent.core.errors import KernelError

__all__ = ["UNEXPECTED", "Received", "SignalWatch"]

UNEXPECTED: tuple[signal.Signals, ...] = (
    signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGQUIT, signal.SIGALRM,
    signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO, signal.SIGPWR, signal.SIGTSTP,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGURG, signal.SIGTRAP,
    signal.SIGHUP,  # agentd has no reload on SIGHUP (the init script restarts it)
)
SFD_CLOEXEC = os.O_CLOEXEC
SFD_NONBLOCK = os.O_NONBLOCK
_SIGINFO = struct.Struct("=IiiIIiIIIIiiQQQQH46x")  # struct signalfd_siginfo, 128 bytes
assert _SIGINFO.size == 128

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_signalfd = _libc.signalfd
_signalfd.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_signalfd.restype = ctypes.c_int


@dataclass(frozen=True)
class Received:
    sig: int
    name: str
    pid: int  # the sender (0: the kernel)
    uid: int
    code: int  # si_code: SI_USER 0, SI_QUEUE -1, SI_TKILL -6, > 0 from the kernel


def _sigset(signals: tuple[signal.Signals, ...]) -> bytes:
    """A glibc ``sigset_t`` (128 bytes): bit ``sig - 1`` per signal."""
    bits = 0
    for s in signals:
        bits |= 1 << (int(s) - 1)
    return bits.to_bytes(8, "little") + bytes(120)


class SignalWatch:
    """The signalfd of :data:`UNEXPECTED`; ``fileno`` for the loop, ``read`` when ready."""

    def __init__(self, signals: tuple[signal.Signals, ...] = UNEXPECTED) -> None:
        self.signals = signals
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        fd = _signalfd(-1, _sigset(signals), SFD_CLOEXEC | SFD_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            raise KernelError("signalfd", "unexpected signals", err)
        self.fd: int = int(fd)

    def fileno(self) -> int:
        return self.fd

    def read(self, max_signals: int = 16) -> list[Received]:
        """What is pending (at most ``max_signals``); [] when nothing is."""
        try:
            data = os.read(self.fd, _SIGINFO.size * max_signals)
        except BlockingIOError:
            return []
        out = []
        for off in range(0, len(data) - _SIGINFO.size + 1, _SIGINFO.size):
            signo, _errno, code, pid, uid = _SIGINFO.unpack_from(data, off)[:5]
            try:
                name = signal.Signals(signo).name
            except ValueError:
                name = f"SIG{signo}"
            out.append(Received(signo, name, pid, uid, code))
        return out

    def close(self) -> None:
        """Close the fd; the signals stay blocked (their default would end agentd)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
