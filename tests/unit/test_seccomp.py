"""The seccomp compiler, checked by running its programs through the interpreter.

The expected action is computed from the spec by ``expected_action`` (no BPF); the
program must agree with it for every syscall number on both architectures, with the
arguments its rules look at, and for random specs with random argument rules.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import seccomp as sc
from agent.core import syscalls as ksys
from agent.core.errors import ConfigError
from agent.core.syscallpolicy import ArgRule, Cond

ARCHES = sorted(ksys.AUDIT_ARCH)
NAMES = sorted(ksys.SYSCALLS)
NOTIF, ENOSYS, ALLOW = sc.RET_USER_NOTIF, sc.RET_ENOSYS, sc.RET_ALLOW

# arguments that exercise every default rule: namespace flags, socket families and
# netlink protocols, device and FIFO modes, personalities
ARGS = [(0,), (ksys.CLONE_NEWUSER,), (0x11,), (0x400,), ((1 << 40) | ksys.CLONE_NEWNS,),
        (ksys.AF_UNIX, 1, 0), (ksys.AF_INET6, 2, 0), (ksys.AF_NETLINK, 3, 0),
        (ksys.AF_NETLINK, 3, ksys.NETLINK_KOBJECT_UEVENT), (ksys.AF_VSOCK, 1, 0),
        (ksys.AF_ALG, 5, 0), (ksys.AF_PACKET, 3, 0), ((1 << 32) | ksys.AF_UNIX, 1, 0),
        (0, 0, ksys.S_IFCHR | 0o600, 0), (0, ksys.S_IFBLK | 0o600, 0),
        (0, 0, ksys.S_IFIFO | 0o600, 0), (0, ksys.S_IFIFO | 0o644, 0), (0x0040000,),
        (0xFFFFFFFF,), (8,)]  # fmt: skip


def conds() -> st.SearchStrategy[Cond]:
    mask = st.sampled_from([0xFFFFFFFF, 0xF000, ksys.NS_FLAGS, 0xFF])

    def build(m: int) -> st.SearchStrategy[Cond]:
        vals = st.lists(st.integers(0, 0xFFFFFFFF).map(lambda v: v & m), min_size=1, max_size=4)
        return st.builds(Cond, st.integers(0, 5), vals.map(frozenset), st.just(m))

    return mask.flatmap(build)


def rules() -> st.SearchStrategy[ArgRule]:
    outcome = st.sampled_from(["allow", "deny"])
    case = st.tuples(st.lists(conds(), min_size=1, max_size=3).map(tuple), outcome)
    return st.builds(ArgRule, st.lists(case, max_size=3).map(tuple), outcome, st.just("test"))


@st.composite
def specs(draw: st.DrawFn) -> sc.FilterSpec:
    arch = draw(st.sampled_from(ARCHES))
    chosen = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=120))
    kinds = draw(st.lists(st.sampled_from(["trap", "deny", "enosys", "allow", "rule"]),
                          min_size=len(chosen), max_size=len(chosen)))  # fmt: skip
    sets: dict[str, set[str]] = {k: set() for k in ("trap", "deny", "enosys", "allow", "rule")}
    for name, kind in zip(chosen, kinds, strict=True):
        sets[kind].add(name)
    rs = {n: draw(rules()) for n in sorted(sets["rule"])}
    return sc.FilterSpec(trap=frozenset(sets["trap"]), deny=frozenset(sets["deny"]), arch=arch,
                         enosys=frozenset(sets["enosys"]), allow=frozenset(sets["allow"]),
                         rules=rs)  # fmt: skip


def _numbers(arch: str) -> list[int]:
    table = {ksys.syscall_nr(n, arch) for n in NAMES} - {None}
    return sorted({*range(0, 600), *(n for n in table if n is not None), 0x40000000,
                   0x40000000 + 1, 0x7FFFFFFF, 0xFFFFFFFF})  # fmt: skip


def _check_program(spec: sc.FilterSpec, prog: tuple[sc.Insn, ...]) -> None:
    assert sc.unpack(sc.pack(prog)) == prog
    assert len(prog) < 4096  # BPF_MAXINSNS
    for pc, (code, jt, jf, k) in enumerate(prog):
        if code == 0x05:  # BPF_JA
            assert pc + 1 + k < len(prog)
        elif code & 0x07 == 0x05:  # conditional: both targets inside, 8-bit offsets
            assert 0 <= jt <= 255 and 0 <= jf <= 255
            assert pc + 1 + max(jt, jf) < len(prog)
    assert prog[-1][0] == 0x06  # the last instruction returns


@pytest.mark.parametrize("arch", ARCHES)
def test_default_policy_every_number_with_every_rule_argument(arch: str) -> None:
    spec = sc.FilterSpec(arch=arch)
    prog = sc.compile_filter(spec)
    _check_program(spec, prog)
    audit = ksys.AUDIT_ARCH[arch]
    for nr in _numbers(arch):
        for args in ARGS:
            got = sc.evaluate(prog, nr, audit, args)
            assert got == sc.expected_action(spec, nr, audit, args), (arch, nr, args)


@pytest.mark.parametrize("arch", ARCHES)
def test_default_policy_named_syscalls(arch: str) -> None:
    spec = sc.FilterSpec(arch=arch)
    prog = sc.compile_filter(spec)
    audit = ksys.AUDIT_ARCH[arch]

    def run(name: str, *args: int) -> int:
        nr = ksys.syscall_nr(name, arch)
        assert nr is not None
        return sc.evaluate(prog, nr, audit, args)

    assert run("mount") == run("reboot") == run("sethostname") == NOTIF  # trapped
    assert run("bpf") == run("ptrace") == run("keyctl") == run("setns") == NOTIF  # reported
    assert run("io_uring_setup") == run("perf_event_open") == run("finit_module") == NOTIF
    assert run("quotactl_fd") == NOTIF
    assert run("clone3") == run("fsopen") == run("open_tree_attr") == ENOSYS
    assert run("openat") == run("execve") == run("read") == run("futex") == ALLOW
    assert run("lsm_list_modules") == run("kcmp") == run("statmount") == ENOSYS  # not listed
    assert run("unshare", ksys.CLONE_NEWUSER) == NOTIF
    assert run("unshare", 0x400) == ALLOW  # CLONE_FILES
    assert run("clone", ksys.CLONE_NEWNET | 0x11) == NOTIF
    assert run("clone", 0x11) == ALLOW
    # high bits of a 64-bit argument do not smuggle flags past the low-word check
    assert run("unshare", (1 << 40) | ksys.CLONE_NEWNS) == NOTIF
    assert run("socket", ksys.AF_INET, 1, 0) == run("socket", ksys.AF_UNIX, 5, 0) == ALLOW
    assert run("socket", ksys.AF_NETLINK, 3, ksys.NETLINK_ROUTE) == ALLOW
    assert run("socket", ksys.AF_NETLINK, 3, ksys.NETLINK_KOBJECT_UEVENT) == NOTIF
    assert run("socket", ksys.AF_VSOCK, 1, 0) == run("socket", ksys.AF_ALG, 5, 0) == NOTIF
    assert run("socket", ksys.AF_PACKET, 3, 0) == NOTIF
    assert run("socketpair", ksys.AF_UNIX, 1, 0) == ALLOW
    assert run("socketpair", ksys.AF_VSOCK, 1, 0) == NOTIF
    assert run("mknodat", 0, 0, ksys.S_IFIFO | 0o600, 0) == ALLOW
    assert run("mknodat", 0, 0, ksys.S_IFCHR | 0o600, 0x103) == NOTIF
    assert run("mknodat", 0, 0, ksys.S_IFBLK | 0o600, 0x801) == NOTIF
    assert run("personality", 0xFFFFFFFF) == run("personality", 0) == ALLOW
    assert run("personality", 0x0040000) == NOTIF  # ADDR_NO_RANDOMIZE
    assert sc.evaluate(prog, 0xFFFFFFFF, audit) == (NOTIF if arch == "x86_64" else ENOSYS)


def test_x86_64_only_calls() -> None:
    spec = sc.FilterSpec(arch="x86_64")
    prog = sc.compile_filter(spec)
    audit = ksys.AUDIT_ARCH["x86_64"]
    for name, want in (("mknod", NOTIF), ("iopl", NOTIF), ("arch_prctl", ALLOW),
                       ("open", ALLOW), ("fork", ALLOW)):  # fmt: skip
        nr = ksys.syscall_nr(name, "x86_64")
        assert nr is not None
        args = (0, ksys.S_IFCHR | 0o600, 0) if name == "mknod" else ()
        assert sc.evaluate(prog, nr, audit, args) == want, name
    mknod = ksys.syscall_nr("mknod", "x86_64")
    assert mknod is not None
    assert sc.evaluate(prog, mknod, audit, (0, ksys.S_IFIFO | 0o600, 0)) == ALLOW


@settings(max_examples=80, deadline=None)
@given(specs(), st.integers(0, 2**32 - 1), st.lists(st.integers(0, 2**64 - 1), max_size=6))
def test_compiled_matches_reference(spec: sc.FilterSpec, nr: int, args: list[int]) -> None:
    prog = sc.compile_filter(spec)
    _check_program(spec, prog)
    audit = ksys.AUDIT_ARCH[spec.arch]
    assert sc.evaluate(prog, nr, audit, args) == sc.expected_action(spec, nr, audit, args)
    for name in spec.trap | spec.deny | spec.enosys | spec.allow | frozenset(spec.rules):
        n = ksys.syscall_nr(name, spec.arch)
        if n is not None:
            assert sc.evaluate(prog, n, audit, args) == spec.action_of(name, args), name


@settings(max_examples=40, deadline=None)
@given(specs(), st.data())
def test_rules_match_reference_on_values_they_name(spec: sc.FilterSpec, data: st.DataObject
                                                   ) -> None:  # fmt: skip
    """Random arguments rarely hit a rule's values: build arguments from them."""
    prog = sc.compile_filter(spec)
    audit = ksys.AUDIT_ARCH[spec.arch]
    for name, rule in spec.rules.items():
        n = ksys.syscall_nr(name, spec.arch)
        if n is None:
            continue
        args = [data.draw(st.integers(0, 2**64 - 1)) for _ in range(6)]
        for conds, _ in rule.cases:
            for c in conds:
                v = data.draw(st.sampled_from(sorted(c.values)))
                args[c.arg] = (args[c.arg] & ~c.mask & 0xFFFFFFFF) | v | (args[c.arg] >> 32 << 32)
        assert sc.evaluate(prog, n, audit, args) == spec.action_of(name, args)


@settings(max_examples=40, deadline=None)
@given(specs(), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_foreign_arch_goes_to_the_master(spec: sc.FilterSpec, nr: int, arch: int) -> None:
    if arch == ksys.AUDIT_ARCH[spec.arch]:
        arch ^= 1
    prog = sc.compile_filter(spec)
    assert sc.evaluate(prog, nr, arch) == NOTIF
    other = next(a for a in ARCHES if a != spec.arch)
    assert sc.evaluate(prog, nr, ksys.AUDIT_ARCH[other]) == NOTIF


def test_x32_goes_to_the_master_on_x86_64_only() -> None:
    prog = sc.compile_filter(sc.FilterSpec(arch="x86_64"))
    assert sc.evaluate(prog, 0x40000000 | 1, ksys.AUDIT_ARCH["x86_64"]) == NOTIF
    prog = sc.compile_filter(sc.FilterSpec(arch="aarch64"))
    assert sc.evaluate(prog, 0x40000000 | 1, ksys.AUDIT_ARCH["aarch64"]) == ENOSYS


@pytest.mark.parametrize("arch", ARCHES)
def test_the_search_is_shallow(arch: str) -> None:
    """Any number is decided after a handful of comparisons, not one per rule."""
    spec = sc.FilterSpec(arch=arch)
    prog = sc.compile_filter(spec)
    worst = 0
    for nr in _numbers(arch):
        pc, steps = 4, 0
        while prog[pc][0] in (0x35, 0x05):  # JGE / JA of the search
            code, jt, jf, k = prog[pc]
            steps += 1
            pc += 1 + (k if code == 0x05 else (jt if nr >= k else jf))
        worst = max(worst, steps)
    assert worst <= 2 * 8, worst  # log2(ranges) comparisons, each with at most one JA


def test_spec_validation_names_the_problem() -> None:
    with pytest.raises(ConfigError, match="nosuchcall"):
        sc.FilterSpec(trap=frozenset({"nosuchcall"}))
    with pytest.raises(ConfigError, match="'mount' is both trap and deny"):
        sc.FilterSpec(trap=frozenset({"mount"}), deny=frozenset({"mount"}))
    with pytest.raises(ConfigError, match="architecture"):
        sc.FilterSpec(arch="mips")
    with pytest.raises(ConfigError, match="privileged operation 'fly'"):
        sc.FilterSpec.for_cell(["fly"])
    with pytest.raises(ValueError, match="outside the mask"):
        Cond(0, frozenset({0x100}), mask=0xFF)
    with pytest.raises(ValueError, match="bad argument"):
        Cond(6, frozenset({0}))


def test_for_cell_traps_syscalls_of_granted_ops() -> None:
    spec = sc.FilterSpec.for_cell(["set_time", "leds"], arch="aarch64")
    assert sc.OP_SYSCALLS["set_time"] <= spec.trap
    assert not spec.trap & spec.deny and not spec.trap & spec.enosys
    assert spec.deny == sc.DEFAULT_DENY


def test_policy_tables_are_consistent() -> None:
    """Every name exists; the actions are disjoint; the trapped calls are the ops'."""
    groups = [sc.DEFAULT_TRAP, sc.DEFAULT_DENY, sc.DEFAULT_ENOSYS, sc.DEFAULT_ALLOW,
              frozenset(sc.ARG_RULES)]
    for i, a in enumerate(groups):
        assert a <= set(ksys.SYSCALLS), sorted(a - set(ksys.SYSCALLS))
        for b in groups[i + 1:]:
            assert not a & b, sorted(a & b)
    for syscalls in sc.OP_SYSCALLS.values():
        assert syscalls <= sc.DEFAULT_TRAP
    for name in (*sc.DEFAULT_TRAP, *sc.DEFAULT_DENY, *sc.DEFAULT_ENOSYS, *sc.ARG_RULES):
        assert name in sc.REASONS
    for arch in ARCHES:  # every allowed name exists on at least one arch
        assert any(ksys.syscall_nr(n, arch) is not None for n in sc.DEFAULT_ALLOW)


def test_describe_lists_every_rule_and_fits_80_columns() -> None:
    spec = sc.FilterSpec(arch="aarch64")
    rows = sc.describe(spec)
    named = {r[0] for r in rows}
    assert spec.trap | spec.deny | spec.enosys | set(spec.rules) - {"mknod"} <= named
    actions = {r[0]: r[2] for r in rows}
    assert actions["iopl"] == "absent"  # no such call on arm64
    assert actions["mount"] == "trap" and actions["ptrace"] == "deny"
    assert actions["socket"] == "allow*" and actions["*"] == "errno(ENOSYS)"
    assert all(len(line) <= 80 for line in sc.format_table(rows).splitlines())


def test_interpreter_rejects_unknown_opcode() -> None:
    with pytest.raises(ValueError, match="opcode"):
        sc.evaluate([(0x99, 0, 0, 0)], 0, 0)


HEADER = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


@pytest.mark.skipif(not HEADER.exists(), reason="no x86_64 uapi headers (linux-libc-dev)")
def test_x86_64_numbers_match_the_installed_uapi_header() -> None:
    found = dict(re.findall(r"#define __NR_(\w+) (\d+)", HEADER.read_text()))
    assert len(found) > 300
    for name, nr in found.items():
        assert ksys.syscall_nr(name, "x86_64") == int(nr), name


def test_names_and_numbers_round_trip() -> None:
    for arch in ARCHES:
        for name in NAMES:
            nr = ksys.syscall_nr(name, arch)
            if nr is not None:
                assert ksys.syscall_name(nr, arch) == name
    assert ksys.describe_call(0x40000003, 11) == "i386_11"
    assert ksys.describe_call(ksys.AUDIT_ARCH["x86_64"], 0x40000000 | 165) == "mount"
    assert ksys.arch_name(ksys.AUDIT_ARCH["x86_64"], 0x40000001) == "x32"
    assert ksys.arch_name(0x40000028) == "arm" and ksys.arch_name(7) == "0x7"
    assert errno.ENOSYS == sc.RET_ENOSYS & 0xFFFF
