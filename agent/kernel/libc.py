"""Thin ctypes wrappers for the syscalls the standard library lacks.

Every wrapper raises :class:`~agent.core.errors.KernelError` naming the operation
and the path or object, with errno.  Nothing here decides anything; callers
(``agent.kernel.spawn``, ``agent.core.seccomp``) pass in what they touch.

The wrappers are also used between ``fork`` and ``execve`` in
``agent.kernel.spawn``: they only call into libc through ctypes and build small
Python objects, which is safe in a freshly forked single-threaded child.

The syscall table covers the calls the seccomp policy names plus a few
common ones, for both architectures the agent ships on (x86_64 for
development hosts, aarch64 for boxes).  Numbers come from
``asm/unistd_64.h`` (x86_64) and ``asm-generic/unistd.h`` (aarch64).
"""

from __future__ import annotations

import ctypes
import os
import signal

from agent.core.errors import KernelError
from agent.core.syscalls import HOST_ARCH, MS_BIND, MS_REMOUNT, syscall_nr

__all__ = [
    "cap_last_cap",
    "capbset_drop",
    "capget",
    "capset",
    "clear_ambient",
    "close_range_cloexec",
    "mount",
    "pidfd_open",
    "pidfd_send_signal",
    "pivot_root",
    "raise_ambient",
    "seccomp",
    "set_child_subreaper",
    "set_keepcaps",
    "set_no_new_privs",
    "set_pdeathsig",
    "sethostname",
    "setns",
    "umount2",
    "unshare",
]

# --- architectures ---------------------------------------------------------


# --- constants -------------------------------------------------------------


_PR_SET_PDEATHSIG = 1
_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_VERSION_3 = 0x20080522
_CLOSE_RANGE_CLOEXEC = 1 << 2


def cap_last_cap(proc: str = "/proc") -> int:
    """Highest capability number the running kernel knows."""
    with open(f"{proc}/sys/kernel/cap_last_cap") as f:
        return int(f.read())


# --- libc ------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]  # fmt: skip
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]  # fmt: skip


def _check(ret: int, op: str, target: str, hint: str | None = None) -> int:
    if ret < 0:
        raise KernelError(op, target, ctypes.get_errno(), hint)
    return ret


def _sys(name: str, *args: int | bytes | ctypes.c_void_p | None) -> int:
    nr = syscall_nr(name)
    if nr is None:
        raise KernelError("syscall", name, 38, f"{name} does not exist on {HOST_ARCH}")
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return int(_libc.syscall(ctypes.c_long(nr), *cargs))


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare", hex(flags))


def setns(fd: int, nstype: int, what: str = "") -> None:
    _check(_libc.setns(fd, nstype), "setns", what or f"fd {fd}")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:  # fmt: skip
    ret = _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data))
    if flags & MS_REMOUNT:
        kind = "remount"
    elif flags & MS_BIND:
        kind = "bind"
    else:
        kind = fstype or "propagation"
    _check(ret, f"mount({kind})", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), "umount2", target)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_sys("pivot_root", _b(new_root), _b(put_old)), "pivot_root", new_root)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname", name)


def _prctl(op: int, a: int = 0, b: int = 0, what: str = "prctl") -> None:
    _check(_libc.prctl(op, a, b, 0, 0), what, str(a))


def set_pdeathsig(sig: int) -> None:
    _prctl(_PR_SET_PDEATHSIG, sig, what="prctl(PR_SET_PDEATHSIG)")


def set_child_subreaper(on: bool = True) -> None:
    _prctl(_PR_SET_CHILD_SUBREAPER, int(on), what="prctl(PR_SET_CHILD_SUBREAPER)")


def set_no_new_privs() -> None:
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, what="prctl(PR_SET_NO_NEW_PRIVS)")


def set_keepcaps(on: bool) -> None:
    _prctl(_PR_SET_KEEPCAPS, int(on), what="prctl(PR_SET_KEEPCAPS)")


def capbset_drop(cap: int) -> None:
    _prctl(_PR_CAPBSET_DROP, cap, what="prctl(PR_CAPBSET_DROP)")


def clear_ambient() -> None:
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, what="prctl(PR_CAP_AMBIENT_CLEAR_ALL)")


def raise_ambient(cap: int) -> None:
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap, what="prctl(PR_CAP_AMBIENT_RAISE)")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]  # fmt: skip


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's capability sets (bit masks, bit n = capability n)."""
    hdr = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    ret = _sys("capset", ctypes.addressof(hdr), ctypes.addressof(data))
    _check(ret, "capset", f"eff={effective:#x}")


def capget(pid: int = 0) -> tuple[int, int, int]:
    """(effective, permitted, inheritable) masks of ``pid`` (0 = self)."""
    hdr = _CapHeader(_CAP_VERSION_3, pid)
    data = (_CapData * 2)()
    _check(_sys("capget", ctypes.addressof(hdr), ctypes.addressof(data)), "capget", str(pid))
    return (data[0].effective | data[1].effective << 32,
            data[0].permitted | data[1].permitted << 32,
            data[0].inheritable | data[1].inheritable << 32)  # fmt: skip


def close_range_cloexec(first: int) -> None:
    """Mark every fd >= ``first`` close-on-exec (close_range(2), Linux 5.11)."""
    _check(_sys("close_range", first, 0xFFFFFFFF, _CLOSE_RANGE_CLOEXEC), "close_range", str(first))


def pidfd_open(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except OSError as e:
        raise KernelError.from_oserror("pidfd_open", f"pid {pid}", e) from None


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except OSError as e:
        raise KernelError.from_oserror("pidfd_send_signal", f"pidfd {pidfd}", e) from None


def seccomp(op: int, flags: int, arg: int, what: str = "seccomp") -> int:
    """Raw seccomp(2); ``arg`` is an address (or 0).  Returns the syscall's result."""
    return _check(_sys("seccomp", op, flags, arg), what, f"op={op} flags={flags:#x}")
