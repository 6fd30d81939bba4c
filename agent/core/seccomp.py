"""Seccomp for cells: a pure policy compiler, a tiny BPF interpreter, and the
user-notification adapter the master uses to decide trapped syscalls.

The compiled classic-BPF program is a straight line (see docs/sandbox.md)::

    arch != AUDIT_ARCH(spec.arch)          -> KILL_PROCESS
    x86_64 only: nr >= 0x40000000 (x32)    -> KILL_PROCESS
    nr in spec.trap                        -> USER_NOTIF   (the master decides)
    nr in spec.deny                        -> ERRNO(EPERM)
    nr in spec.enosys                      -> ERRNO(ENOSYS) (callers fall back)
    unshare/clone with CLONE_NEW* in arg0  -> ERRNO(EPERM)
    anything else                          -> ALLOW

:func:`compile_filter` and :func:`evaluate` are pure and run anywhere;
:func:`install_filter`, :func:`recv_notif`, :func:`send_resp` and
:func:`id_valid` talk to the running kernel.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from agent.core import syscalls as ksys
from agent.core.errors import ConfigError

__all__ = [
    "DEFAULT_DENY",
    "DEFAULT_ENOSYS",
    "DEFAULT_TRAP",
    "OP_SYSCALLS",
    "REASONS",
    "RET_ALLOW",
    "RET_ERRNO",
    "RET_KILL_PROCESS",
    "RET_USER_NOTIF",
    "FilterSpec",
    "Insn",
    "action_name",
    "compile_filter",
    "describe",
    "evaluate",
    "expected_action",
    "format_table",
    "pack",
    "unpack",
]

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000
RET_ALLOW = 0x7FFF0000
X32_SYSCALL_BIT = 0x40000000

# Trapped to the master (USER_NOTIF): syscalls that change host-wide state or that a
# manifest may be granted as a privileged operation.  The master answers each one.
REASONS: dict[str, str] = {
    "mount": "master decides (op mount_usb)",
    "umount2": "master decides (op mount_usb)",
    "pivot_root": "only agentd sets a cell's root",
    "reboot": "master decides (op reboot)",
    "settimeofday": "host clock (op set_time)",
    "clock_settime": "host clock (op set_time)",
    "clock_adjtime": "host clock (op set_time)",
    "adjtimex": "host clock (op set_time)",
    "sethostname": "set by agentd (op set_hostname)",
    "setdomainname": "set by agentd (op set_hostname)",
    "init_module": "kernel code: refused, but seen",
    "finit_module": "kernel code: refused, but seen",
    "delete_module": "kernel code: refused, but seen",
    "kexec_load": "replaces the kernel: refused, but seen",
    "swapon": "host-wide memory policy",
    "swapoff": "host-wide memory policy",
    "acct": "host-wide process accounting",
    "quotactl": "host filesystem quotas",
    # denied outright (EPERM), never worth a round trip to the master
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
    # ENOSYS: the caller falls back to a call this filter can see
    "clone3": "flags unreadable; libc uses clone",
    "open_tree": "new mount API; tools fall back to mount",
    "move_mount": "new mount API; tools fall back to mount",
    "fsopen": "new mount API; tools fall back to mount",
    "fsconfig": "new mount API; tools fall back to mount",
    "fsmount": "new mount API; tools fall back to mount",
    "fspick": "new mount API; tools fall back to mount",
    "mount_setattr": "new mount API; tools fall back to mount",
}

DEFAULT_TRAP = frozenset({
    "mount", "umount2", "pivot_root", "reboot", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "init_module",
    "finit_module", "delete_module", "kexec_load", "swapon", "swapoff", "acct", "quotactl",
})  # fmt: skip
DEFAULT_ENOSYS = frozenset({
    "clone3", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr",
})  # fmt: skip
DEFAULT_DENY = frozenset(REASONS) - DEFAULT_TRAP - DEFAULT_ENOSYS

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
}

_NS_GUARDED = ("unshare", "clone")  # arg0 holds CLONE_* flags on both arches


@dataclass(frozen=True)
class FilterSpec:
    """What the filter does with each syscall name, for one architecture."""

    trap: frozenset[str] = DEFAULT_TRAP
    deny: frozenset[str] = DEFAULT_DENY
    arch: str = ksys.HOST_ARCH
    enosys: frozenset[str] = DEFAULT_ENOSYS
    deny_ns_flags: bool = field(default=True)

    def __post_init__(self) -> None:
        if self.arch not in ksys.AUDIT_ARCH:
            raise ConfigError("E_SECCOMP", f"unknown architecture {self.arch!r}",
                              f"one of {sorted(ksys.AUDIT_ARCH)}")  # fmt: skip
        sets = {"trap": self.trap, "deny": self.deny, "enosys": self.enosys}
        for label, names in sets.items():
            unknown = sorted(n for n in names if n not in ksys.SYSCALLS)
            if unknown:
                raise ConfigError("E_SECCOMP", f"seccomp {label}: unknown syscall {unknown[0]!r}",
                                  "add it to agent.core.syscalls.SYSCALLS with both numbers")
        for a, b in (("trap", "deny"), ("trap", "enosys"), ("deny", "enosys")):
            both = sorted(sets[a] & sets[b])
            if both:
                raise ConfigError("E_SECCOMP", f"syscall {both[0]!r} is both {a} and {b}",
                                  "give each syscall one action")  # fmt: skip

    @classmethod
    def for_cell(cls, ops: Iterable[str] = (), arch: str = ksys.HOST_ARCH) -> FilterSpec:
        """Default policy plus a trap for every syscall of the granted privileged ``ops``."""
        extra: set[str] = set()
        for op in ops:
            if op not in OP_SYSCALLS:
                raise ConfigError("E_SECCOMP", f"unknown privileged operation {op!r}",
                                  f"one of {sorted(OP_SYSCALLS)}")  # fmt: skip
            extra |= OP_SYSCALLS[op]
        trap = DEFAULT_TRAP | extra
        return cls(trap=trap, deny=DEFAULT_DENY - trap, arch=arch, enosys=DEFAULT_ENOSYS - trap)

    def action_of(self, name: str) -> int:
        """The return value for ``name`` regardless of arguments (ALLOW if unlisted)."""
        if name in self.trap:
            return RET_USER_NOTIF
        if name in self.deny:
            return RET_ERRNO | errno.EPERM
        if name in self.enosys:
            return RET_ERRNO | errno.ENOSYS
        return RET_ALLOW


# --- compiler ----------------------------------------------------------------

Insn = tuple[int, int, int, int]  # (code, jt, jf, k) as in struct sock_filter

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_OFF_NR, _OFF_ARCH, _OFF_ARG0_LO = 0, 4, 16


def compile_filter(spec: FilterSpec) -> tuple[Insn, ...]:
    """Compile ``spec`` into a classic BPF program for seccomp (pure)."""
    prog: list[Insn] = [
        (_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_JEQ_K, 1, 0, ksys.AUDIT_ARCH[spec.arch]),
        (_RET_K, 0, 0, RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, _OFF_NR),
    ]
    if spec.arch == "x86_64":  # x32 ABI shares the arch value; a different table: kill
        prog += [(_JGE_K, 0, 1, X32_SYSCALL_BIT), (_RET_K, 0, 0, RET_KILL_PROCESS)]
    rules = []
    for name in spec.trap | spec.deny | spec.enosys:
        nr = ksys.syscall_nr(name, spec.arch)
        if nr is not None:
            rules.append((nr, spec.action_of(name)))
    for nr, action in sorted(rules):
        prog += [(_JEQ_K, 0, 1, nr), (_RET_K, 0, 0, action)]
    if spec.deny_ns_flags:
        for name in _NS_GUARDED:
            nr = ksys.syscall_nr(name, spec.arch)
            if nr is None or spec.action_of(name) != RET_ALLOW:
                continue
            prog += [
                (_JEQ_K, 0, 4, nr),
                (_LD_W_ABS, 0, 0, _OFF_ARG0_LO),  # CLONE_NEW* all live in the low word
                (_JSET_K, 0, 1, ksys.NS_FLAGS),
                (_RET_K, 0, 0, RET_ERRNO | errno.EPERM),
                (_RET_K, 0, 0, RET_ALLOW),
            ]
    prog.append((_RET_K, 0, 0, RET_ALLOW))
    return tuple(prog)


def pack(prog: Sequence[Insn]) -> bytes:
    """Serialize to an array of ``struct sock_filter`` (native byte order)."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def unpack(raw: bytes) -> tuple[Insn, ...]:
    return tuple(struct.iter_unpack("=HBBI", raw))


def expected_action(spec: FilterSpec, nr: int, arch: int, arg0: int = 0) -> int:
    """What the program *should* return, computed from the spec alone (reference)."""
    if arch != ksys.AUDIT_ARCH[spec.arch]:
        return RET_KILL_PROCESS
    if spec.arch == "x86_64" and nr >= X32_SYSCALL_BIT:
        return RET_KILL_PROCESS
    idx = 0 if spec.arch == "x86_64" else 1
    names = [n for n, nrs in ksys.SYSCALLS.items() if nrs[idx] == nr]
    for name in names:
        action = spec.action_of(name)
        if action != RET_ALLOW:
            return action
        if spec.deny_ns_flags and name in _NS_GUARDED and arg0 & ksys.NS_FLAGS:
            return RET_ERRNO | errno.EPERM
    return RET_ALLOW


def evaluate(prog: Sequence[Insn], nr: int, arch: int, args: Sequence[int] = (),
             ip: int = 0) -> int:  # fmt: skip
    """Run ``prog`` over one ``struct seccomp_data`` (the subset of BPF the compiler emits)."""
    full = [*args, 0, 0, 0, 0, 0, 0][:6]
    data = struct.pack("<IIQ6Q", nr & 0xFFFFFFFF, arch, ip, *(a & (2**64 - 1) for a in full))
    acc, pc = 0, 0
    while pc < len(prog):
        code, jt, jf, k = prog[pc]
        if code == _RET_K:
            return k
        if code == _LD_W_ABS:
            (acc,) = struct.unpack_from("<I", data, k)
            pc += 1
            continue
        if code == _JEQ_K:
            cond = acc == k
        elif code == _JGE_K:
            cond = acc >= k
        elif code == _JSET_K:
            cond = bool(acc & k)
        else:
            raise ValueError(f"unsupported BPF opcode {code:#x} at {pc}")
        pc += 1 + (jt if cond else jf)
    raise ValueError("BPF program fell off its end")


def action_name(ret: int) -> str:
    if ret == RET_ALLOW:
        return "allow"
    if ret == RET_USER_NOTIF:
        return "notify"
    if ret == RET_KILL_PROCESS:
        return "kill"
    if ret & 0xFFFF0000 == RET_ERRNO:
        return f"errno({errno.errorcode.get(ret & 0xFFFF, ret & 0xFFFF)})"
    return f"{ret:#x}"


def describe(spec: FilterSpec) -> list[tuple[str, str, str, str]]:
    """Rows (syscall, number on spec.arch, action, reason) for ``agentctl inspect``."""
    rows = []
    for name in sorted(spec.trap | spec.deny | spec.enosys):
        nr = ksys.syscall_nr(name, spec.arch)
        action = action_name(spec.action_of(name)) if nr is not None else "absent"
        rows.append((name, "-" if nr is None else str(nr), action, REASONS.get(name, "manifest")))
    if spec.deny_ns_flags:
        for name in _NS_GUARDED:
            nr = ksys.syscall_nr(name, spec.arch)
            if nr is not None and spec.action_of(name) == RET_ALLOW:
                rows.append((name, str(nr), "errno(EPERM)*", "*only with CLONE_NEW* flags"))
    rows.append(("*", "-", "allow", "everything else"))
    x32 = " or x32" if spec.arch == "x86_64" else ""
    rows.append(("arch", "-", "kill", f"not {spec.arch}{x32}"))
    return rows


def format_table(rows: Sequence[tuple[str, str, str, str]], width: int = 80) -> str:
    out = []
    for name, nr, action, reason in rows:
        line = f"{name:<18} {nr:>4} {action:<14} {reason}"
        out.append(line if len(line) <= width else line[: width - 1] + "…")
    return "\n".join(out)


# --- kernel: install and user notification -----------------------------------


