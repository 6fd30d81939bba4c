"""Seccomp for cells: a pure policy compiler and a tiny BPF interpreter.

The policy is data (:mod:`agent.core.syscallpolicy`); :class:`FilterSpec` is one cell's
copy of it, and :func:`compile_filter` turns it into a classic-BPF program
(docs/sandbox.md)::

    arch != AUDIT_ARCH(spec.arch)          -> USER_NOTIF (the master kills: foreign ABI)
    x86_64 only: nr >= 0x40000000 (x32)    -> USER_NOTIF (the master kills)
    nr in spec.trap                        -> USER_NOTIF (the master decides)
    nr in spec.deny                        -> USER_NOTIF (the master refuses and reports)
    nr in spec.enosys                      -> ERRNO(ENOSYS) (callers fall back)
    nr with an argument rule               -> ALLOW, or USER_NOTIF (refused, reported)
    nr in spec.allow                       -> ALLOW
    anything else                          -> ERRNO(ENOSYS)

The syscall number is dispatched by a binary search over ranges of numbers with one
action (about 8 comparisons for any call, not one per rule); the kernel's action cache
(5.11+) skips the program entirely for calls allowed whatever their arguments.
:func:`evaluate` runs a program over one ``struct seccomp_data`` (the BPF the compiler
emits), and :func:`expected_action` computes the same answer from the spec without BPF:
the unit tests hold the two against each other.  Installing the program and the user
notification ioctls are in :mod:`agent.kernel.seccomp`.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from agent.core import syscalls as ksys
from agent.core.errors import ConfigError
from agent.core.syscallpolicy import (
    ARG_RULES,
    DEFAULT_ALLOW,
    DEFAULT_DENY,
    DEFAULT_ENOSYS,
    DEFAULT_TRAP,
    OP_ALLOWS,
    OP_SYSCALLS,
    REASONS,
    ArgRule,
    Cond,
)

__all__ = [
    "ARG_RULES",
    "DEFAULT_ALLOW",
    "DEFAULT_DENY",
    "DEFAULT_ENOSYS",
    "DEFAULT_TRAP",
    "OP_SYSCALLS",
    "REASONS",
    "RET_ALLOW",
    "RET_ENOSYS",
    "RET_ERRNO",
    "RET_KILL_PROCESS",
    "RET_USER_NOTIF",
    "ArgRule",
    "Cond",
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
RET_ENOSYS = RET_ERRNO | errno.ENOSYS
X32_SYSCALL_BIT = ksys.X32_SYSCALL_BIT
_OUTCOME = {"allow": RET_ALLOW, "deny": RET_USER_NOTIF}


@dataclass(frozen=True)
class FilterSpec:
    """What the filter does with each syscall name, for one architecture.  A name in
    ``trap``, ``deny`` or ``enosys`` takes that action whatever ``allow`` and ``rules``
    say; a name with a rule is allowed when its arguments pass."""

    trap: frozenset[str] = DEFAULT_TRAP
    deny: frozenset[str] = DEFAULT_DENY
    arch: str = ksys.HOST_ARCH
    enosys: frozenset[str] = DEFAULT_ENOSYS
    allow: frozenset[str] = DEFAULT_ALLOW
    rules: Mapping[str, ArgRule] = field(default_factory=lambda: ARG_RULES)

    def __post_init__(self) -> None:
        if self.arch not in ksys.AUDIT_ARCH:
            raise ConfigError("E_SECCOMP", f"unknown architecture {self.arch!r}",
                              f"one of {sorted(ksys.AUDIT_ARCH)}")  # fmt: skip
        sets = {"trap": self.trap, "deny": self.deny, "enosys": self.enosys,
                "allow": self.allow, "rules": frozenset(self.rules)}
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
        """Default policy plus a trap for every syscall of the granted privileged ``ops``
        (and what ``OP_ALLOWS`` lets an op make outright: ``memfd``)."""
        extra: set[str] = set()
        allowed: set[str] = set()
        for op in ops:
            if op not in OP_SYSCALLS:
                raise ConfigError("E_SECCOMP", f"unknown privileged operation {op!r}",
                                  f"one of {sorted(OP_SYSCALLS)}")  # fmt: skip
            extra |= OP_SYSCALLS[op]
            allowed |= OP_ALLOWS.get(op, frozenset())
        trap = DEFAULT_TRAP | extra
        return cls(trap=trap, deny=DEFAULT_DENY - trap - allowed, arch=arch,
                   enosys=DEFAULT_ENOSYS - trap, allow=DEFAULT_ALLOW | allowed)

    def rule_of(self, name: str) -> ArgRule | None:
        """The argument rule that decides ``name``, if its action depends on arguments."""
        if name in self.trap or name in self.deny or name in self.enosys:
            return None
        return self.rules.get(name)

    def action_of(self, name: str, args: Sequence[int] = ()) -> int:
        """The return value for a call of ``name`` with ``args`` (pure reference)."""
        if name in self.trap or name in self.deny:
            return RET_USER_NOTIF
        if name in self.enosys:
            return RET_ENOSYS
        rule = self.rule_of(name)
        if rule is not None:
            return _OUTCOME[rule.outcome(tuple(args))]
        return RET_ALLOW if name in self.allow else RET_ENOSYS


# --- compiler ----------------------------------------------------------------

Insn = tuple[int, int, int, int]  # (code, jt, jf, k) as in struct sock_filter

_LD_W_ABS = 0x20
_ALU_AND_K = 0x54
_JA = 0x05
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_OFF_NR, _OFF_ARCH, _OFF_ARGS = 0, 4, 16
_Target = int | ArgRule  # a return value, or a rule deciding on the arguments


def _arg_lo(arg: int) -> int:
    return _OFF_ARGS + 8 * arg  # little-endian: the low word first (both arches)


def _rule_code(rule: ArgRule) -> list[Insn]:
    """The cases in order, then ``otherwise``; a failing condition skips to the next
    case.  Every jump is forward and short (a few instructions)."""
    code: list[Insn] = []
    for conds, outcome in reversed(rule.cases):
        block: list[Insn] = [(_RET_K, 0, 0, _OUTCOME[outcome])]
        for cond in reversed(conds):
            vals = sorted(cond.values)
            rest = len(block)  # a miss on the last value skips what follows this test
            tests = [(_JEQ_K, len(vals) - 1 - i, 0 if i < len(vals) - 1 else rest, v)
                     for i, v in enumerate(vals)]
            load = [(_LD_W_ABS, 0, 0, _arg_lo(cond.arg))]
            if cond.mask != 0xFFFFFFFF:
                load.append((_ALU_AND_K, 0, 0, cond.mask))
            block = load + tests + block
        code = block + code
    return [*code, (_RET_K, 0, 0, _OUTCOME[rule.otherwise])]


def _ranges(spec: FilterSpec) -> list[tuple[int, _Target]]:
    """(first number, target) of each run of numbers with one target, over all 2**32."""
    by_nr: dict[int, _Target] = {}
    for name in spec.trap | spec.deny | spec.enosys | spec.allow | frozenset(spec.rules):
        nr = ksys.syscall_nr(name, spec.arch)
        if nr is None:
            continue
        rule = spec.rule_of(name)
        by_nr[nr] = rule if rule is not None else spec.action_of(name)
    if spec.arch == "x86_64":
        by_nr[X32_SYSCALL_BIT] = RET_USER_NOTIF  # and every number above it
    out: list[tuple[int, _Target]] = []

    def add(first: int, target: _Target) -> None:
        last = out[-1][1] if out else None
        if isinstance(target, int) and isinstance(last, int) and last == target:
            return  # the run goes on
        out.append((first, target))

    add(0, RET_ENOSYS)
    for nr in sorted(by_nr):
        add(nr, by_nr[nr])
        if nr + 1 < 2**32 and nr + 1 not in by_nr and nr != X32_SYSCALL_BIT:
            add(nr + 1, RET_ENOSYS)
    return out


def _search(ranges: list[tuple[int, _Target]]) -> list[Insn]:
    """A balanced binary search over ``ranges`` on the number in the accumulator."""
    if len(ranges) == 1:
        target = ranges[0][1]
        return _rule_code(target) if isinstance(target, ArgRule) else [(_RET_K, 0, 0, target)]
    mid = len(ranges) // 2
    left, right = _search(ranges[:mid]), _search(ranges[mid:])
    first = ranges[mid][0]
    if len(left) <= 255:
        return [(_JGE_K, len(left), 0, first), *left, *right]
    return [(_JGE_K, 0, 1, first), (_JA, 0, 0, len(left)), *left, *right]


def compile_filter(spec: FilterSpec) -> tuple[Insn, ...]:
    """Compile ``spec`` into a classic BPF program for seccomp (pure)."""
    prog: list[Insn] = [
        (_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_JEQ_K, 1, 0, ksys.AUDIT_ARCH[spec.arch]),
        (_RET_K, 0, 0, RET_USER_NOTIF),  # a foreign ABI: the master kills the process
        (_LD_W_ABS, 0, 0, _OFF_NR),
        *_search(_ranges(spec)),
    ]
    return tuple(prog)


def pack(prog: Sequence[Insn]) -> bytes:
    """Serialize to an array of ``struct sock_filter`` (native byte order)."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def unpack(raw: bytes) -> tuple[Insn, ...]:
    return tuple(struct.iter_unpack("=HBBI", raw))


def expected_action(spec: FilterSpec, nr: int, arch: int, args: Sequence[int] = ()) -> int:
    """What the program *should* return, computed from the spec alone (reference)."""
    nr &= 0xFFFFFFFF
    if arch != ksys.AUDIT_ARCH[spec.arch]:
        return RET_USER_NOTIF
    if spec.arch == "x86_64" and nr >= X32_SYSCALL_BIT:
        return RET_USER_NOTIF
    name = ksys.syscall_name(nr, spec.arch)
    return RET_ENOSYS if name is None else spec.action_of(name, args)


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
        if code == _ALU_AND_K:
            acc &= k
            pc += 1
            continue
        if code == _JA:
            pc += 1 + k
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
    """Rows (syscall, number on spec.arch, action, reason) for ``agentctl inspect``: each
    syscall with its own rule, then the allow-list as one row."""
    rows = []
    for name in sorted(spec.trap | spec.deny | spec.enosys):
        nr = ksys.syscall_nr(name, spec.arch)
        action = ("trap" if name in spec.trap else "deny" if name in spec.deny
                  else action_name(RET_ENOSYS))
        rows.append((name, "-" if nr is None else str(nr), action if nr is not None else "absent",
                     REASONS.get(name, "manifest")))
    for name in sorted(spec.rules):
        nr = ksys.syscall_nr(name, spec.arch)
        if spec.rule_of(name) is not None and nr is not None:
            rows.append((name, str(nr), "allow*", spec.rules[name].why))
    allowed = sum(1 for n in spec.allow - spec.trap - spec.deny - spec.enosys
                  if ksys.syscall_nr(n, spec.arch) is not None)
    rows.append(("(allow-list)", "-", "allow", f"{allowed} syscalls (docs/sandbox.md)"))
    rows.append(("*", "-", action_name(RET_ENOSYS), "every other syscall"))
    x32 = " or x32" if spec.arch == "x86_64" else ""
    rows.append(("arch", "-", "kill", f"not {spec.arch}{x32}: the master kills"))
    return rows


def format_table(rows: Sequence[tuple[str, str, str, str]], width: int = 80) -> str:
    out = []
    for name, nr, action, reason in rows:
        line = f"{name:<18} {nr:>4} {action:<14} {reason}"
        out.append(line if len(line) <= width else line[: width - 1] + "…")
    return "\n".join(out)
