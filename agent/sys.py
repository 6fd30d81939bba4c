"""Thin ctypes wrappers for the syscalls the standard library lacks.

Every wrapper raises :class:`~agent.errors.KernelError` naming the operation
and the path or object, with errno.  Nothing here decides anything; callers
(``agent.spawn``, ``agent.seccomp``) pass in what they touch.

The wrappers are also used between ``fork`` and ``execve`` in
``agent.spawn``: they only call into libc through ctypes and build small
Python objects, which is safe in a freshly forked single-threaded child.

The syscall table covers the calls the seccomp policy names plus a few
common ones, for both architectures the agent ships on (x86_64 for
development hosts, aarch64 for boxes).  Numbers come from
``asm/unistd_64.h`` (x86_64) and ``asm-generic/unistd.h`` (aarch64).
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal

from agent.errors import KernelError

__all__ = [
    "AUDIT_ARCH", "CAPS", "CLONE_NEWCGROUP", "CLONE_NEWIPC", "CLONE_NEWNET", "CLONE_NEWNS",
    "CLONE_NEWPID", "CLONE_NEWTIME", "CLONE_NEWUSER", "CLONE_NEWUTS", "HOST_ARCH", "MNT_DETACH",
    "MS_BIND", "MS_NODEV", "MS_NOEXEC", "MS_NOSUID", "MS_PRIVATE", "MS_RDONLY", "MS_REC",
    "MS_REMOUNT", "MS_SHARED", "MS_SLAVE", "NS_FLAGS", "SYSCALLS", "cap_last_cap", "cap_number",
    "capbset_drop", "capget", "capset", "clear_ambient", "close_range_cloexec", "mount",
    "normalize_arch", "pidfd_open", "pidfd_send_signal", "pivot_root", "raise_ambient", "seccomp",
    "set_child_subreaper", "set_keepcaps", "set_no_new_privs", "set_pdeathsig", "sethostname",
    "setns", "syscall_nr", "umount2", "unshare",
]  # fmt: skip

# --- architectures ---------------------------------------------------------

AUDIT_ARCH: dict[str, int] = {
    "x86_64": 0xC000003E,  # AUDIT_ARCH_X86_64 = EM_X86_64 | 64BIT | LE
    "aarch64": 0xC00000B7,  # AUDIT_ARCH_AARCH64 = EM_AARCH64 | 64BIT | LE
}


def normalize_arch(machine: str) -> str:
    """Map ``platform.machine()`` spellings to the table's keys."""
    m = machine.lower()
    if m in ("x86_64", "amd64"):
        return "x86_64"
    if m in ("aarch64", "arm64"):
        return "aarch64"
    raise KernelError("arch", machine, 95, "the agent supports x86_64 and aarch64 only")


HOST_ARCH = normalize_arch(platform.machine())

# name: (x86_64, aarch64); None when the call does not exist on that arch.
SYSCALLS: dict[str, tuple[int | None, int | None]] = {
    "read": (0, 63), "write": (1, 64), "open": (2, None), "close": (3, 57),
    "openat": (257, 56), "execve": (59, 221), "execveat": (322, 281),
    "exit": (60, 93), "exit_group": (231, 94), "clone": (56, 220), "clone3": (435, 435),
    "fork": (57, None), "vfork": (58, None), "wait4": (61, 260), "kill": (62, 129),
    "tgkill": (234, 131), "getpid": (39, 172), "socket": (41, 198), "connect": (42, 203),
    "bind": (49, 200), "sendmsg": (46, 211), "recvmsg": (47, 212), "mmap": (9, 222),
    "mprotect": (10, 226), "munmap": (11, 215), "brk": (12, 214), "ioctl": (16, 29),
    "prctl": (157, 167), "capset": (126, 91), "capget": (125, 90), "setuid": (105, 146),
    "setgid": (106, 144), "setresuid": (117, 147), "setresgid": (119, 149),
    "setgroups": (116, 159), "chroot": (161, 51), "mknod": (133, None), "mknodat": (259, 33),
    "rt_sigreturn": (15, 139), "nanosleep": (35, 101), "futex": (202, 98),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "reboot": (169, 142),
    "settimeofday": (164, 170), "clock_settime": (227, 112), "clock_adjtime": (305, 266),
    "adjtimex": (159, 171), "sethostname": (170, 161), "setdomainname": (171, 162),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "swapon": (167, 224),
    "swapoff": (168, 225), "acct": (163, 89), "quotactl": (179, 60), "bpf": (321, 280),
    "perf_event_open": (298, 241), "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264), "userfaultfd": (323, 282), "keyctl": (250, 219),
    "add_key": (248, 217), "request_key": (249, 218), "ptrace": (101, 117),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "setns": (308, 268),
    "unshare": (272, 97), "iopl": (172, None), "ioperm": (173, None), "syslog": (103, 116),
    "vhangup": (153, 58), "lookup_dcookie": (212, 18), "uselib": (134, None),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "open_tree": (428, 428), "move_mount": (429, 429),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442), "seccomp": (317, 277), "pidfd_open": (434, 434),
    "pidfd_send_signal": (424, 424), "close_range": (436, 436),
}  # fmt: skip

_ARCH_INDEX = {"x86_64": 0, "aarch64": 1}


def syscall_nr(name: str, arch: str = HOST_ARCH) -> int | None:
    """Number of syscall ``name`` on ``arch``; None if it does not exist there."""
    return SYSCALLS[name][_ARCH_INDEX[arch]]


# --- constants -------------------------------------------------------------

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NS_FLAGS = (CLONE_NEWTIME | CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC
            | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET)  # fmt: skip

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 2

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

CAPS: dict[str, int] = {name: i for i, name in enumerate((
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid",
    "setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast",
    "net_admin", "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio",
    "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
    "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write",
    "audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
    "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
))}  # fmt: skip


def cap_number(name: str) -> int:
    """``"CAP_NET_RAW"`` or ``"net_raw"`` -> 13.  KeyError for unknown names."""
    key = name.lower()
    return CAPS[key[4:] if key.startswith("cap_") else key]


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
