"""The cell seccomp policy as data: which syscalls a cell may make, which the master
decides, which are refused and reported, and which arguments are checked (pure).

The filter is an **allow-list**: a syscall not named here gets ``ENOSYS`` (as Docker's
default profile does for calls newer than it knows), so a call added to a later kernel is
refused until someone reads what it does.  The list is Docker's default profile
(moby ``profiles/seccomp/default.json``) for the 64-bit ABIs, without what that profile
grants only with capabilities a cell never holds, and with these differences (each
written beside its entry): ``ptrace``, ``process_vm_*``, ``pidfd_getfd``, ``io_uring_*``,
``name_to_handle_at`` are refused and reported; the clock, host name, mount, reboot,
module and swap calls are trapped to the master; ``socket``, ``socketpair``, ``mknod*``,
``personality``, ``clone`` and ``unshare`` have their arguments checked.

Actions (docs/sandbox.md, "The seccomp filter"):

* ``DEFAULT_TRAP``: USER_NOTIF, the master decides from the manifest's privileged
  operations (``OP_SYSCALLS``) and the arguments it copies out of the cell;
* ``DEFAULT_DENY``: USER_NOTIF too, but the master always refuses and reports
  (``syscall/denied``): these are escape attempts, worth an event, and a round trip only
  for calls that are refused anyway;
* ``DEFAULT_ENOSYS``: ERRNO(ENOSYS) at once, so callers fall back to a call the filter can
  read (``clone3`` -> ``clone``, the new mount API -> ``mount``);
* ``ARG_RULES``: allowed, unless an argument says otherwise (then refused and reported);
* ``DEFAULT_ALLOW``: ALLOW.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from agent.core import syscalls as abi

__all__ = [
    "ARG_RULES",
    "DEFAULT_ALLOW",
    "DEFAULT_DENY",
    "DEFAULT_ENOSYS",
    "DEFAULT_TRAP",
    "OP_ALLOWS",
    "OP_SYSCALLS",
    "REASONS",
    "ArgRule",
    "Cond",
    "Outcome",
]

Outcome = Literal["allow", "deny"]
LOW32 = 0xFFFFFFFF

# Trapped to the master (USER_NOTIF): syscalls that change host-wide state or that a
# manifest may be granted as a privileged operation.  The master answers each one.
_TRAP: dict[str, str] = {
    "mount": "master decides (op mount_usb)",
    "umount2": "master decides (op mount_usb)",
    "pivot_root": "only agentd sets a cell's root",
    "reboot": "master decides (op reboot)",
    "settimeofday": "host clock (op set_time)",
    "clock_settime": "host clock (op set_time)",
    "clock_adjtime": "host clock (op set_time)",
    "adjtimex": "host clock (op set_time)",
    "sethostname": "host name (op set_hostname)",
    "setdomainname": "host name (op set_hostname)",
    "init_module": "kernel code: refused, but seen",
    "finit_module": "kernel code: refused, but seen",
    "delete_module": "kernel code: refused, but seen",
    "kexec_load": "replaces the kernel: refused, but seen",
    "swapon": "host-wide memory policy",
    "swapoff": "host-wide memory policy",
    "acct": "host-wide process accounting",
    "quotactl": "host filesystem quotas",
    "quotactl_fd": "host filesystem quotas",
}
# Refused by the master and reported (USER_NOTIF): escape attempts.
_DENY: dict[str, str] = {
    "bpf": "programs in the host kernel",
    "perf_event_open": "side channels, kernel attack surface",
    "kexec_file_load": "replaces the running kernel",
    "open_by_handle_at": "escapes any mount namespace",
    "name_to_handle_at": "pair of open_by_handle_at",
    "userfaultfd": "wins kernel races in exploits",
    "keyctl": "kernel keyring is not namespaced",
    "add_key": "kernel keyring is not namespaced",
    "request_key": "kernel keyring is not namespaced",
    "ptrace": "debug from the host; old seccomp bypass",
    "process_vm_readv": "other processes' memory (like ptrace)",
    "process_vm_writev": "other processes' memory (like ptrace)",
    "pidfd_getfd": "other processes' files (like ptrace)",
    "setns": "a cell never joins other namespaces",
    "iopl": "raw port I/O",
    "ioperm": "raw port I/O",
    "syslog": "host kernel log leaks addresses",
    "vhangup": "hangs up the terminal",
    "lookup_dcookie": "profiling interface",
    "uselib": "obsolete loader interface",
    "io_uring_setup": "io_uring ops bypass this filter",
    "io_uring_enter": "io_uring ops bypass this filter",
    "io_uring_register": "io_uring ops bypass this filter",
    "memfd_create": "exec protection cannot see a memory file's exec (op memfd)",
}
# ERRNO(ENOSYS): the caller falls back to a call this filter can see.
_ENOSYS: dict[str, str] = {
    "clone3": "flags unreadable; libc uses clone",
    "open_tree": "new mount API; tools fall back to mount",
    "open_tree_attr": "new mount API; tools fall back to mount",
    "move_mount": "new mount API; tools fall back to mount",
    "fsopen": "new mount API; tools fall back to mount",
    "fsconfig": "new mount API; tools fall back to mount",
    "fsmount": "new mount API; tools fall back to mount",
    "fspick": "new mount API; tools fall back to mount",
    "mount_setattr": "new mount API; tools fall back to mount",
}

DEFAULT_TRAP = frozenset(_TRAP)
DEFAULT_DENY = frozenset(_DENY)
DEFAULT_ENOSYS = frozenset(_ENOSYS)

# Docker's default allow-list for the 64-bit ABIs (x86_64 and aarch64; a name missing on
# one arch is skipped there), less what is trapped, refused or checked above.
DEFAULT_ALLOW = frozenset("""
accept accept4 access alarm arch_prctl bind brk cachestat capget capset chdir chmod chown
chroot clock_getres clock_gettime clock_nanosleep close close_range connect copy_file_range
creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait
eventfd eventfd2 execve exit exit_group faccessat faccessat2 fadvise64 fallocate
fanotify_mark fchdir fchmod fchmodat fchmodat2 fchown fchownat fcntl fdatasync fgetxattr
flistxattr flock fork fremovexattr fsetxattr fstat fstatfs fsync ftruncate futex
futex_requeue futex_wait futex_waitv futex_wake futimesat get_robust_list get_thread_area
getcpu getcwd getdents getdents64 getegid geteuid getgid getgroups getitimer getpeername
getpgid getpgrp getpid getppid getpriority getrandom getresgid getresuid getrlimit getrusage
getsid getsockname getsockopt gettid gettimeofday getuid getxattr getxattrat
inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel io_destroy
io_getevents io_pgetevents io_setup io_submit ioctl ioprio_get ioprio_set kill
landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lgetxattr link linkat
listen listxattr listxattrat llistxattr lremovexattr lseek lsetxattr lstat madvise
map_shadow_stack membarrier memfd_secret mincore mkdir mkdirat mlock mlock2
mlockall mmap modify_ldt mprotect mq_getsetattr mq_notify mq_open mq_timedreceive
mq_timedsend mq_unlink mremap mseal msgctl msgget msgrcv msgsnd msync munlock munlockall
munmap nanosleep newfstatat open openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2
pkey_alloc pkey_free pkey_mprotect poll ppoll prctl pread64 preadv preadv2 prlimit64
process_mrelease pselect6 pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv
recvfrom recvmmsg recvmsg remap_file_pages removexattr removexattrat rename renameat
renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask
rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo
sched_get_priority_max sched_get_priority_min sched_getaffinity sched_getattr
sched_getparam sched_getscheduler sched_rr_get_interval sched_setaffinity sched_setattr
sched_setparam sched_setscheduler sched_yield seccomp select semctl semget semop semtimedop
sendfile sendmmsg sendmsg sendto set_robust_list set_thread_area set_tid_address setfsgid
setfsuid setgid setgroups setitimer setpgid setpriority setregid setresgid setresuid
setreuid setrlimit setsid setsockopt setuid setxattr setxattrat shmat shmctl shmdt shmget
shutdown sigaltstack signalfd signalfd4 splice stat statfs statx symlink symlinkat sync
sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete timer_getoverrun
timer_gettime timer_settime timerfd_create timerfd_gettime timerfd_settime times tkill
truncate umask uname unlink unlinkat utime utimensat utimes vfork vmsplice wait4 waitid
write writev
""".split())


@dataclass(frozen=True)
class Cond:
    """Holds when the low 32 bits of argument ``arg``, masked with ``mask``, are one of
    ``values``.  Every argument checked here is at most 32 bits wide in the kernel (an
    ``int``, a ``umode_t``, ``lower_32_bits(clone_flags)``), so the high word cannot
    smuggle anything past the check."""

    arg: int
    values: frozenset[int]
    mask: int = LOW32

    def __post_init__(self) -> None:
        if not 0 <= self.arg < 6 or not self.values or not 0 < self.mask <= LOW32:
            raise ValueError(f"bad argument condition {self!r}")
        if any(not 0 <= v <= LOW32 or v & ~self.mask for v in self.values):
            raise ValueError(f"condition values outside the mask: {self!r}")

    def holds(self, args: tuple[int, ...]) -> bool:
        return (args[self.arg] & LOW32 & self.mask) in self.values


@dataclass(frozen=True)
class ArgRule:
    """For one syscall: the first case whose conditions all hold gives the outcome;
    when none does, ``otherwise``.  ``deny`` is a refusal the master reports."""

    cases: tuple[tuple[tuple[Cond, ...], Outcome], ...]
    otherwise: Outcome
    why: str

    def outcome(self, args: tuple[int, ...]) -> Outcome:
        full = (*args, 0, 0, 0, 0, 0, 0)[:6]
        for conds, out in self.cases:
            if all(c.holds(full) for c in conds):
                return out
        return self.otherwise


def _one_of(arg: int, *values: int, mask: int = LOW32) -> Cond:
    return Cond(arg, frozenset(values), mask)


_Case = tuple[tuple[Cond, ...], Outcome]
_NO_NS: _Case = ((_one_of(0, 0, mask=abi.NS_FLAGS),), "allow")
_DEVICE: _Case = ((_one_of(2, abi.S_IFCHR, abi.S_IFBLK, mask=abi.S_IFMT),), "deny")

ARG_RULES: Mapping[str, ArgRule] = MappingProxyType({
    "clone": ArgRule((_NO_NS,), "deny", "no CLONE_NEW* flags: no new namespaces"),
    "unshare": ArgRule((_NO_NS,), "deny", "no CLONE_NEW* flags: no new namespaces"),
    # no vsock (not network-namespaced), no AF_ALG, no uevents (NETLINK_KOBJECT_UEVENT),
    # no family or protocol whose module the kernel would load on demand
    "socket": ArgRule((
        ((_one_of(0, abi.AF_UNIX, abi.AF_INET, abi.AF_INET6),), "allow"),
        ((_one_of(0, abi.AF_NETLINK), _one_of(2, abi.NETLINK_ROUTE)), "allow"),
    ), "deny", "unix, inet, inet6, netlink route only"),
    "socketpair": ArgRule((((_one_of(0, abi.AF_UNIX),), "allow"),), "deny", "AF_UNIX only"),
    "mknodat": ArgRule((_DEVICE,), "allow", "FIFOs and files, no device nodes"),
    "mknod": ArgRule((((_one_of(1, abi.S_IFCHR, abi.S_IFBLK, mask=abi.S_IFMT),), "deny"),),
                     "allow", "FIFOs and files, no device nodes"),
    # Docker's list: PER_LINUX, UNAME26, PER_LINUX32, PER_LINUX32|UNAME26 and the query;
    # ADDR_NO_RANDOMIZE and READ_IMPLIES_EXEC help exploits
    # fexecve's call: an fd exec (a memfd's, whatever its mount) escapes channel 1
    "execveat": ArgRule((((_one_of(4, abi.AT_EMPTY_PATH, mask=abi.AT_EMPTY_PATH),), "deny"),),
                        "allow", "no AT_EMPTY_PATH: exec protection checks paths"),
    "personality": ArgRule(
        (((_one_of(0, 0x0, 0x8, 0x20000, 0x20008, LOW32),), "allow"),), "deny",
        "PER_LINUX(32), UNAME26: ASLR stays on"),
})  # fmt: skip

REASONS: dict[str, str] = {**_TRAP, **_DENY, **_ENOSYS,
                           **{name: rule.why for name, rule in ARG_RULES.items()}}

# The manifest's privileged operations and the syscalls through which a cell asks for them.
# Operations done through files (sysctl_net, dvb_tuner, leds) have no syscall to trap.
OP_SYSCALLS: dict[str, frozenset[str]] = {
    "set_time": frozenset({"settimeofday", "clock_settime", "clock_adjtime", "adjtimex"}),
    "set_hostname": frozenset({"sethostname", "setdomainname"}),
    "mount_usb": frozenset({"mount", "umount2"}),
    "reboot": frozenset({"reboot"}),
    "sysctl_net": frozenset(),
    "dvb_tuner": frozenset(),
    "leds": frozenset(),
    "memfd": frozenset(),  # allowed outright: OP_ALLOWS
}
# Operations that allow syscalls outright instead of trapping them (nothing to ask the
# master: the call only refuses what channel 1 cannot check, docs/exec.md).
OP_ALLOWS: dict[str, frozenset[str]] = {"memfd": frozenset({"memfd_create"})}
