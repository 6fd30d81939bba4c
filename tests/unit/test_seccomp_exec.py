"""Channel 1's rules in the seccomp filter (docs/exec.md, "Memory-only execution"):
``memfd_create`` is refused and reported unless the manifest grants ``memfd``, and
``execveat`` with ``AT_EMPTY_PATH`` (an fd exec: fexecve, a memfd's exec) is refused
and reported whatever the grants; a path exec through execveat still runs.  The
compiled BPF and the spec's reference are both asked, on both ABIs."""

from __future__ import annotations

import errno

import pytest

from agent.core import syscalls as ksys
from agent.core.manifest import parse_manifest
from agent.core.planner import filter_spec
from agent.core.seccomp import (
    RET_ALLOW,
    RET_USER_NOTIF,
    FilterSpec,
    compile_filter,
    evaluate,
    expected_action,
)
from agent.monitor.syscall.rules import classify, deny_errno

AT_FDCWD = -100 & 0xFFFFFFFFFFFFFFFF


def action(spec: FilterSpec, name: str, args: tuple[int, ...] = ()) -> int:
    nr = ksys.syscall_nr(name, spec.arch)
    assert nr is not None
    arch = ksys.AUDIT_ARCH[spec.arch]
    got = evaluate(compile_filter(spec), nr, arch, args)
    assert got == expected_action(spec, nr, arch, args)
    return got


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_memfd_create_is_refused_unless_granted(arch: str) -> None:
    assert action(FilterSpec.for_cell(arch=arch), "memfd_create") == RET_USER_NOTIF
    assert action(FilterSpec.for_cell(["memfd"], arch=arch), "memfd_create") == RET_ALLOW
    assert action(FilterSpec.for_cell(["reboot"], arch=arch), "memfd_create") == RET_USER_NOTIF
    # the master refuses it with EPERM and reports it (syscall/denied)
    t = classify(arch, ksys.AUDIT_ARCH[arch], ksys.syscall_nr("memfd_create", arch) or 0)
    assert (t.kind, deny_errno(t.name)) == ("denied", errno.EPERM)


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
@pytest.mark.parametrize("ops", [(), ("memfd",)], ids=["default", "memfd"])
def test_execveat_runs_paths_but_never_an_fd(arch: str, ops: tuple[str, ...]) -> None:
    spec = FilterSpec.for_cell(ops, arch=arch)
    fd_exec = (3, 0x1000, 0, 0, ksys.AT_EMPTY_PATH)
    assert action(spec, "execveat", fd_exec) == RET_USER_NOTIF
    assert action(spec, "execveat", (3, 0x1000, 0, 0, ksys.AT_EMPTY_PATH | 0x100)) == \
        RET_USER_NOTIF  # with AT_SYMLINK_NOFOLLOW too
    assert action(spec, "execveat", (AT_FDCWD, 0x1000, 0, 0, 0)) == RET_ALLOW
    assert action(spec, "execveat", (3, 0x1000, 0, 0, 0x100)) == RET_ALLOW
    # the high word of the flags cannot hide the bit (the kernel reads an int)
    assert action(spec, "execveat", (3, 0x1000, 0, 0, (1 << 32) | ksys.AT_EMPTY_PATH)) == \
        RET_USER_NOTIF
    assert action(spec, "execve") == RET_ALLOW


def test_the_manifest_grants_memfd() -> None:
    m = parse_manifest('name = "c"\n[service]\ncommand = "/bin/sh"\n[image]\nroot = "/i"\n'
                       '[privileges]\nops = ["memfd"]\n')
    assert "memfd" in m.privileges.ops
    assert "memfd_create" in filter_spec(m).allow
