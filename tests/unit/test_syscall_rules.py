"""Channel 2's pure decisions: what a trapped call is, and each operation's verdict.

Exhaustive where the space is small (every syscall on both arches, every subset of the
granted operations, every mount flag bit), property-based where it is not (host names,
mount option strings, id maps).
"""

from __future__ import annotations

import errno
import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core import seccomp as sc
from agent.core import syscalls as abi
from agent.core.grants import PRIVILEGED_OPS
from agent.monitor.syscall import ops
from agent.monitor.syscall.rules import attrs, classify, deny_errno, op_of, severity

ARCHES = sorted(abi.AUDIT_ARCH)
OPS = sorted(PRIVILEGED_OPS)
TRAPPED = sorted(sc.DEFAULT_TRAP)


def trapped(name: str, *args: int, arch: str = abi.HOST_ARCH) -> ops.Trapped:
    nr = abi.syscall_nr(name, arch)
    assert nr is not None
    return classify(arch, abi.AUDIT_ARCH[arch], nr, args)


@pytest.mark.parametrize("arch", ARCHES)
def test_every_notified_syscall_has_one_kind(arch: str) -> None:
    """What the filter notifies is a trap (the master decides) or a denial (reported);
    the kinds follow the policy's tables exactly."""
    spec = sc.FilterSpec(arch=arch)
    for name in sorted(abi.SYSCALLS):
        nr = abi.syscall_nr(name, arch)
        if nr is None:
            continue
        t = classify(arch, abi.AUDIT_ARCH[arch], nr)
        assert t.name == name and t.abi == arch
        if name in spec.trap:
            assert t.kind == "trap", name
        elif name in spec.deny or name in spec.rules:
            assert t.kind == "denied", name
    for syscalls in sc.OP_SYSCALLS.values():
        for name in syscalls:
            assert trapped(name, arch=arch).kind == "trap"


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_a_foreign_abi_is_killed(audit: int, nr: int) -> None:
    for arch in ARCHES:
        t = classify(arch, audit, nr)
        native = audit == abi.AUDIT_ARCH[arch]
        x32 = arch == "x86_64" and bool(nr & abi.X32_SYSCALL_BIT)
        assert (t.kind == "killed") == (not native or x32)
        if t.kind == "killed":
            assert t.op == "none" and (t.abi != arch or x32)


def test_names_of_foreign_calls() -> None:
    assert classify("aarch64", 0x40000028, 20).name == "arm_20"
    assert classify("x86_64", 0x40000003, 1).abi == "i386"
    t = classify("x86_64", abi.AUDIT_ARCH["x86_64"], abi.X32_SYSCALL_BIT | 165)
    assert (t.kind, t.name, t.abi) == ("killed", "mount", "x32")


def test_op_of_and_errnos() -> None:
    for op, syscalls in sc.OP_SYSCALLS.items():
        for name in syscalls:
            assert op_of(name) == op
    assert op_of("init_module") == op_of("pivot_root") == "none"
    assert deny_errno("socket") == deny_errno("socketpair") == errno.EAFNOSUPPORT
    assert deny_errno("ptrace") == errno.EPERM
    assert severity("killed") == "alert" and severity("denied") == severity("trap") == "notice"


def test_event_attributes_follow_the_vocabulary() -> None:
    proc = {"pid": 3, "hpid": 4000, "comm": "x", "exe": "/bin/x"}
    a = attrs(trapped("sethostname"), "denied", proc, error="EPERM", reason=None)
    assert a == {"syscall": "sethostname", "verdict": "denied", "nr": a["nr"], "op":
                 "set_hostname", "error": "EPERM", **proc}  # fmt: skip
    d = attrs(trapped("ptrace"), "denied", proc)
    assert d["reason"] == sc.REASONS["ptrace"] and "op" not in d
    k = attrs(classify("aarch64", 0x40000028, 20), "killed", proc)
    assert k["arch"] == "arm" and k["verdict"] == "killed"


def test_nothing_is_decided_for_an_operation_not_granted() -> None:
    """Every trapped syscall, every subset of operations: without its op, EPERM at once
    (no memory read); with it, never refused for that reason."""
    for n in range(len(OPS) + 1):
        for granted in itertools.combinations(OPS, n):
            g = frozenset(granted)
            for name in TRAPPED:
                for arch in ARCHES:
                    if abi.syscall_nr(name, arch) is None:
                        continue
                    p = ops.plan(trapped(name, arch=arch), g)
                    op = op_of(name)
                    if op not in g:
                        assert isinstance(p, ops.Decision) and p.error == errno.EPERM, name
                    elif isinstance(p, ops.Decision):
                        assert p.reason != "operation not granted", (name, p)


# -- each operation ------------------------------------------------------------------------

HOSTNAME = frozenset({"set_hostname"})
TIME = frozenset({"set_time"})
USB = frozenset({"mount_usb"})


def test_hostname_lengths_and_copies() -> None:
    for size, want in ((-1, errno.EINVAL), (65, errno.EINVAL), (1 << 32 | 3, None),
                       (64, None), (0, None)):  # fmt: skip
        p = ops.plan(trapped("sethostname", 0x1000, size), HOSTNAME)
        if want is None:
            assert p == (ops.Need(0, size & 0xFFFFFFFF),)
        else:
            assert isinstance(p, ops.Decision) and p.error == want


def _label_ok(label: str) -> bool:  # an independent reading of RFC 1123
    chars = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
    return bool(label) and set(label) <= chars and label[0] != "-" and label[-1] != "-"


@given(st.text(alphabet="ab9-.;/ \0é", max_size=20))
def test_hostnames_follow_rfc_1123(name: str) -> None:
    raw = name.encode()
    d = ops.decide(trapped("sethostname", 0x1000, len(raw)), {0: raw})
    ok = name.isascii() and all(_label_ok(x) for x in name.split("."))
    assert (d.verdict == "allowed") == ok, name
    if ok:
        assert d.action == ops.SetHostname(name)
    else:
        assert d.error == errno.EINVAL


def test_clock_settime_and_settimeofday() -> None:
    assert ops.plan(trapped("clock_settime", 0, 0x10), TIME) == (ops.Need(1, 16),)
    for clock in (1, 4, 0xFFFFFFFF):  # MONOTONIC, MONOTONIC_RAW, -1
        p = ops.plan(trapped("clock_settime", clock, 0x10), TIME)
        assert isinstance(p, ops.Decision) and p.error == errno.EINVAL
    ts = trapped("clock_settime", 0, 0x10)
    good = ops.decide(ts, {1: struct.pack("<qq", 1_800_000_000, 5)})
    assert good.action == ops.SetClock(1_800_000_000 * 10**9 + 5)
    for sec, nsec in ((86400, 0), (ops.MAX_CLOCK_S, 0), (1_800_000_000, 10**9),
                      (1_800_000_000, -1)):  # fmt: skip
        assert ops.decide(ts, {1: struct.pack("<qq", sec, nsec)}).error == errno.EINVAL
    tv = trapped("settimeofday", 0x10, 0)
    assert ops.decide(tv, {0: struct.pack("<qq", 1_800_000_000, 999_999)}).action == \
        ops.SetClock(1_800_000_000 * 10**9 + 999_999_000)
    assert ops.decide(tv, {0: struct.pack("<qq", 1_800_000_000, 10**6)}).error == errno.EINVAL
    tz = ops.plan(trapped("settimeofday", 0x10, 0x20), TIME)
    assert isinstance(tz, ops.Decision) and tz.error == errno.EPERM
    noop = ops.plan(trapped("settimeofday", 0, 0), TIME)
    assert noop == ops.Decision("allowed")


@pytest.mark.parametrize("bit", range(32))
def test_adjtimex_modes_bit_by_bit(bit: int) -> None:
    t = trapped("adjtimex", 0x10)
    d = ops.decide(t, {0: struct.pack("<I", 1 << bit) + b"\0" * 204})
    if (1 << bit) & ops.ADJ_MODES:
        assert isinstance(d.action, ops.AdjTime) and d.action.arg == 0
    else:
        assert d.error == errno.EINVAL
    c = trapped("clock_adjtime", 0, 0x10)
    assert ops.plan(c, TIME) == (ops.Need(1, ops.TIMEX_SIZE),)
    bad = ops.plan(trapped("clock_adjtime", 1, 0x10), TIME)
    assert isinstance(bad, ops.Decision) and bad.error == errno.EINVAL


def test_reboot_magic_and_commands() -> None:
    g = frozenset({"reboot"})
    m1, magics = 0xFEE1DEAD, (672274793, 85072278, 369367448, 537993216)
    for m2 in magics:
        d = ops.plan(trapped("reboot", m1, m2, 0x01234567), g)
        assert d == ops.Decision("allowed", action=ops.Reboot("restart"))
    for cmd, how in ((0x4321FEDC, "poweroff"), (0xCDEF0123, "halt")):
        assert ops.plan(trapped("reboot", m1, magics[0], cmd), g) == \
            ops.Decision("allowed", action=ops.Reboot(how))
    for cmd in (0, 0x89ABCDEF, 0xA1B2C3D4, 0xD000FCE2, 0x45584543):  # CAD, RESTART2, kexec
        d = ops.plan(trapped("reboot", m1, magics[0], cmd), g)
        assert isinstance(d, ops.Decision) and d.error == errno.EPERM
    for a, b in ((m1, 1), (1, magics[0])):
        d = ops.plan(trapped("reboot", a, b, 0x01234567), g)
        assert isinstance(d, ops.Decision) and d.error == errno.EINVAL


def _mount(flags: int, source: bytes = b"/dev/sda1", target: bytes = b"/media/usb",
           fstype: bytes = b"vfat", data: bytes | None = None) -> ops.Decision:
    t = trapped("mount", 0x10, 0x20, 0x30, flags, 0x40 if data is not None else 0)
    p = ops.plan(t, USB)
    if isinstance(p, ops.Decision):
        return p
    mem = {0: source, 1: target, 2: fstype}
    if data is not None:
        mem[4] = data
    assert {n.arg for n in p} == set(mem)
    return ops.decide(t, mem)


@pytest.mark.parametrize("bit", range(32))
def test_mount_flags_bit_by_bit(bit: int) -> None:
    d = _mount(1 << bit)
    allowed = (1 << bit) & (ops.MS_RDONLY | ops.MS_NOSUID | ops.MS_NODEV | ops.MS_NOEXEC
                            | ops.MS_SYNCHRONOUS | ops.MS_DIRSYNC | ops.MS_NOSYMFOLLOW
                            | ops.MS_NOATIME | ops.MS_NODIRATIME | ops.MS_SILENT
                            | ops.MS_RELATIME | ops.MS_STRICTATIME | ops.MS_LAZYTIME)
    if allowed:
        assert isinstance(d.action, ops.MountUsb), (bit, d)
        attrs_ = d.action.attrs
        assert attrs_ & ops.ATTR_NOSUID and attrs_ & ops.ATTR_NODEV and attrs_ & ops.ATTR_NOEXEC
    else:  # bind, remount, move, rec, propagation, ...: never through mount_usb
        assert d.verdict == "denied" and d.error == errno.EPERM, bit


def test_mount_sources_types_and_options() -> None:
    ok = _mount(ops.MS_MGC_VAL | ops.MS_RDONLY, data=b"uid=1000,gid=100,utf8,umask=022")
    assert isinstance(ok.action, ops.MountUsb)
    a = ok.action
    assert (a.device, a.target, a.fstype, a.uid, a.gid) == ("sda1", "/media/usb", "vfat",
                                                             1000, 100)
    assert a.options == (("utf8", None), ("umask", "022")) and a.sb_flags == ("ro",)
    assert a.attrs & ops.ATTR_RDONLY
    for source in (b"/dev/mmcblk0p1", b"/dev/sda1/../sdb", b"sda1", b"/dev/loop0", b"none",
                   b"/dev/sda1\xff"):  # fmt: skip
        assert _mount(0, source=source).error == errno.EPERM, source
    for fstype in (b"tmpfs", b"proc", b"cgroup2", b"overlay", b"ext4\xff"):
        assert _mount(0, fstype=fstype).error == errno.EPERM, fstype
    assert _mount(0, fstype=b"ext4").verdict == "allowed"
    assert _mount(0, target=b"relative").error == errno.EINVAL
    for data in (b"errors=panic", b"exec", b"suid", b"uid=x", b"dev", b"iocharset=a;b",
                 b"uid=99999999999", b"discard\xff"):  # fmt: skip
        assert _mount(0, data=data).verdict == "denied", data
    assert _mount(0, fstype=b"ext4", data=b"uid=0").error == errno.EPERM  # no uid on ext4


@given(st.lists(st.sampled_from(["uid=5", "gid=6", "utf8", "umask=077", "errors=continue",
                                 "discard", "shortname=mixed", "x=1", "suid", ""]), max_size=6))
def test_mount_options_are_all_or_nothing(items: list[str]) -> None:
    d = _mount(0, data=",".join(items).encode())
    bad = {"x=1", "suid"} & set(items)
    assert (d.verdict == "denied") == bool(bad)
    if not bad:
        assert isinstance(d.action, ops.MountUsb)
        keys = [k for k, _ in d.action.options]
        assert "uid" not in keys and "gid" not in keys  # passed as ids, mapped by the master


def test_umount_flags_and_target() -> None:
    for flags, ok in ((0, True), (ops.MNT_DETACH, True), (ops.MNT_FORCE | ops.UMOUNT_NOFOLLOW,
                      True), (ops.MNT_EXPIRE, False), (0x10, False)):  # fmt: skip
        p = ops.plan(trapped("umount2", 0x10, flags), USB)
        assert (p == (ops.Need(0, ops.PATH_MAX, True),)) == ok, flags
    t = trapped("umount2", 0x10, 0)
    assert ops.decide(t, {0: b"/media/usb"}).action == ops.Umount("/media/usb", 0)
    assert ops.decide(t, {0: b"media"}).error == errno.EINVAL


@given(st.integers(0, 2**32 - 1), st.lists(st.tuples(st.integers(0, 2**20),
                                                     st.integers(0, 2**31),
                                                     st.integers(1, 2**16)), max_size=3))
def test_map_id(inside: int, lines: list[tuple[int, int, int]]) -> None:
    text = "\n".join(f"{a} {b} {c}" for a, b, c in lines) + "\nbad line\n"
    want = next((b + inside - a for a, b, c in lines if a <= inside < a + c), None)
    assert ops.map_id(inside, text) == want
