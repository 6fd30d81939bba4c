"""The seccomp compiler, checked by running its programs through the interpreter.

The expected action is computed from the spec by ``expected_action`` (no BPF);
the program must agree with it for every syscall number on both architectures.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import seccomp as sc
from agent.core import syscalls as ksys
from agent.core.errors import ConfigError

ARCHES = sorted(ksys.AUDIT_ARCH)
NAMES = sorted(ksys.SYSCALLS)


@st.composite
def specs(draw: st.DrawFn) -> sc.FilterSpec:
    arch = draw(st.sampled_from(ARCHES))
    chosen = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=40))
    kinds = draw(st.lists(st.sampled_from(["trap", "deny", "enosys"]), min_size=len(chosen),
                          max_size=len(chosen)))  # fmt: skip
    sets: dict[str, set[str]] = {"trap": set(), "deny": set(), "enosys": set()}
    for name, kind in zip(chosen, kinds, strict=True):
        sets[kind].add(name)
    return sc.FilterSpec(trap=frozenset(sets["trap"]), deny=frozenset(sets["deny"]), arch=arch,
                         enosys=frozenset(sets["enosys"]),
                         deny_ns_flags=draw(st.booleans()))  # fmt: skip


def _numbers(arch: str) -> list[int]:
    table = {ksys.syscall_nr(n, arch) for n in NAMES} - {None}
    return sorted({*range(0, 600), *(n for n in table if n is not None), 0x40000000 + 1,
                   0xFFFFFFFF})  # fmt: skip


@pytest.mark.parametrize("arch", ARCHES)
def test_default_policy_every_number(arch: str) -> None:
    spec = sc.FilterSpec(arch=arch)
    prog = sc.compile_filter(spec)
    audit = ksys.AUDIT_ARCH[arch]
    for nr in _numbers(arch):
        for arg0 in (0, ksys.CLONE_NEWUSER, 0x11):  # 0x11 = SIGCHLD, what fork passes
            got = sc.evaluate(prog, nr, audit, [arg0])
            assert got == sc.expected_action(spec, nr, audit, arg0), (arch, nr, arg0)


@pytest.mark.parametrize("arch", ARCHES)
def test_default_policy_named_syscalls(arch: str) -> None:
    spec = sc.FilterSpec(arch=arch)
    prog = sc.compile_filter(spec)
    audit = ksys.AUDIT_ARCH[arch]

    def run(name: str, arg0: int = 0) -> int:
        nr = ksys.syscall_nr(name, arch)
        assert nr is not None
        return sc.evaluate(prog, nr, audit, [arg0])

    assert run("mount") == sc.RET_USER_NOTIF
    assert run("reboot") == sc.RET_USER_NOTIF
    assert run("bpf") == sc.RET_ERRNO | errno.EPERM
    assert run("clone3") == sc.RET_ERRNO | errno.ENOSYS
    assert run("openat") == sc.RET_ALLOW
    assert run("execve") == sc.RET_ALLOW
    assert run("unshare", ksys.CLONE_NEWUSER) == sc.RET_ERRNO | errno.EPERM
    assert run("unshare", 0x400) == sc.RET_ALLOW  # CLONE_FILES
    assert run("clone", ksys.CLONE_NEWNET | 0x11) == sc.RET_ERRNO | errno.EPERM
    assert run("clone", 0x11) == sc.RET_ALLOW
    # high bits of a 64-bit argument do not smuggle flags past the low-word check
    assert run("unshare", (1 << 40) | ksys.CLONE_NEWNS) == sc.RET_ERRNO | errno.EPERM


@settings(max_examples=60, deadline=None)
@given(specs(), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_compiled_matches_reference(spec: sc.FilterSpec, nr: int, arg0: int) -> None:
    prog = sc.compile_filter(spec)
    audit = ksys.AUDIT_ARCH[spec.arch]
    assert sc.evaluate(prog, nr, audit, [arg0]) == sc.expected_action(spec, nr, audit, arg0)
    for name in spec.trap | spec.deny | spec.enosys:
        n = ksys.syscall_nr(name, spec.arch)
        if n is not None:
            assert sc.evaluate(prog, n, audit, [arg0]) == spec.action_of(name)


@settings(max_examples=40, deadline=None)
@given(specs(), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_foreign_arch_is_killed(spec: sc.FilterSpec, nr: int, arch: int) -> None:
    if arch == ksys.AUDIT_ARCH[spec.arch]:
        arch ^= 1
    prog = sc.compile_filter(spec)
    assert sc.evaluate(prog, nr, arch) == sc.RET_KILL_PROCESS
    other = next(a for a in ARCHES if a != spec.arch)
    assert sc.evaluate(prog, nr, ksys.AUDIT_ARCH[other]) == sc.RET_KILL_PROCESS


def test_x32_is_killed_on_x86_64_only() -> None:
    prog = sc.compile_filter(sc.FilterSpec(arch="x86_64"))
    assert sc.evaluate(prog, 0x40000000 | 1, ksys.AUDIT_ARCH["x86_64"]) == sc.RET_KILL_PROCESS
    prog = sc.compile_filter(sc.FilterSpec(arch="aarch64"))
    assert sc.evaluate(prog, 0x40000000 | 1, ksys.AUDIT_ARCH["aarch64"]) == sc.RET_ALLOW


@settings(max_examples=30, deadline=None)
@given(specs())
def test_pack_roundtrip_and_jumps_in_range(spec: sc.FilterSpec) -> None:
    prog = sc.compile_filter(spec)
    assert sc.unpack(sc.pack(prog)) == prog
    assert len(sc.pack(prog)) == 8 * len(prog) and len(prog) < 4096
    for pc, (code, jt, jf, _k) in enumerate(prog):
        if code & 0x07 == 0x05:  # BPF_JMP: every target inside the program
            assert pc + 1 + max(jt, jf) < len(prog)
    assert prog[-1] == (0x06, 0, 0, sc.RET_ALLOW)


def test_spec_validation_names_the_problem() -> None:
    with pytest.raises(ConfigError, match="nosuchcall"):
        sc.FilterSpec(trap=frozenset({"nosuchcall"}))
    with pytest.raises(ConfigError, match="'mount' is both trap and deny"):
        sc.FilterSpec(trap=frozenset({"mount"}), deny=frozenset({"mount"}))
    with pytest.raises(ConfigError, match="architecture"):
        sc.FilterSpec(arch="mips")
    with pytest.raises(ConfigError, match="privileged operation 'fly'"):
        sc.FilterSpec.for_cell(["fly"])


def test_for_cell_traps_syscalls_of_granted_ops() -> None:
    spec = sc.FilterSpec.for_cell(["set_time", "leds"], arch="aarch64")
    assert sc.OP_SYSCALLS["set_time"] <= spec.trap
    assert not spec.trap & spec.deny and not spec.trap & spec.enosys
    assert spec.deny == sc.DEFAULT_DENY


def test_describe_lists_every_rule_and_fits_80_columns() -> None:
    spec = sc.FilterSpec(arch="aarch64")
    rows = sc.describe(spec)
    named = {r[0] for r in rows}
    assert spec.trap | spec.deny | spec.enosys <= named
    assert dict((r[0], r[2]) for r in rows)["iopl"] == "absent"  # no such call on arm64
    assert all(len(line) <= 80 for line in sc.format_table(rows).splitlines())


def test_interpreter_rejects_unknown_opcode() -> None:
    with pytest.raises(ValueError, match="opcode"):
        sc.evaluate([(0x99, 0, 0, 0)], 0, 0)
