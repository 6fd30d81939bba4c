"""The kernel ABI numbers the agent needs, in one table per architecture: syscall numbers
(aarch64 and x86_64), ``AUDIT_ARCH`` values, clone, mount and capability constants.
Pure data: the seccomp compiler and the libc wrappers read it; nothing here calls the
kernel.
"""

from __future__ import annotations

import platform

from agent.core.errors import KernelError

__all__ = [
    "AUDIT_ARCH",
    "CAPS",
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWTIME",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "HOST_ARCH",
    "MNT_DETACH",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "MS_SHARED",
    "MS_SLAVE",
    "NS_FLAGS",
    "SYSCALLS",
    "cap_number",
    "normalize_arch",
    "syscall_nr",
]

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
