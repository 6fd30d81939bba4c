"""The sandbox's pure parts (agent.core.sandbox): the /proc paths masked and made
read-only, the mount plan, and the spec checks per mode (with or without a user
namespace); and which alternative of a mask the set-up child takes (dir or file).

The kernel side is tests/privileged/test_spawn.py (the x86 host) and
tests/guest/test_isolation.py (the box, both modes).
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core import syscalls as ksys
from agent.core.errors import ConfigError, KernelError
from agent.core.grants import NOUSERNS_KEEPABLE
from agent.core.sandbox import (
    DEFAULT_MOUNTS,
    PROC_MASKED,
    PROC_READ_ONLY,
    SYS_MASKED,
    Mount,
    MountOp,
    SpawnSpec,
    UidMap,
    check_spec,
    plan_mounts,
)
from agent.kernel import spawnchild

ROOT = Path(__file__).resolve().parents[2]
IMG = "/img"
# What runc/crun, Docker (moby oci/defaults.go), containerd, Podman and Kubernetes
# (DefaultProcMount) mask and make read-only: every one must stay in the union.
DOCKER_MASKED = {"/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys",
                 "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                 "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                 "/sys/devices/virtual/powercap"}
KUBERNETES_MASKED = DOCKER_MASKED | {"/proc/interrupts",
                                     "/sys/devices/system/cpu/cpu*/thermal_throttle"}
PODMAN_MASKED = {"/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                 "/proc/sched_debug", "/proc/scsi", "/proc/timer_list", "/proc/timer_stats",
                 "/sys/dev/block", "/sys/devices/virtual/powercap", "/sys/firmware",
                 "/sys/fs/selinux"}
READ_ONLY = {"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"}
NOUSERNS = {"uid": 1000, "gid": 1000}


def _ours() -> tuple[set[str], set[str]]:
    masked = {f"/proc/{p}" for p in PROC_MASKED} | {f"/sys/{p}" for p in SYS_MASKED}
    return masked, {f"/proc/{p}" for p in PROC_READ_ONLY}


def test_the_lists_are_the_union_of_the_peers() -> None:
    masked, ro = _ours()
    assert DOCKER_MASKED | KUBERNETES_MASKED | PODMAN_MASKED <= masked
    assert READ_ONLY == ro
    assert len(set(PROC_MASKED)) == len(PROC_MASKED) and not set(PROC_MASKED) & set(
        PROC_READ_ONLY)


def _plan(mounts: tuple[Mount, ...] = DEFAULT_MOUNTS) -> tuple[MountOp, ...]:
    return plan_mounts(IMG, mounts, 1000, 1000, 0)


def test_every_read_only_path_is_bound_read_only_if_present() -> None:
    ops = _plan()
    for sub in PROC_READ_ONLY:
        t = f"{IMG}/proc/{sub}"
        mine = [op for op in ops if op.target == t]
        assert [op.source for op in mine] == [t, None], mine
        assert all(op.optional and op.if_dir is None for op in mine)
        assert mine[1].flags & ksys.MS_RDONLY and mine[1].flags & ksys.MS_REMOUNT


def test_every_masked_path_is_hidden_as_a_dir_or_as_a_file_if_present() -> None:
    ops = _plan()
    proc = next(i for i, op in enumerate(ops) if op.fstype == "proc")
    for sub in PROC_MASKED:
        t = f"{IMG}/proc/{sub}"
        mine = [(i, op) for i, op in enumerate(ops) if op.target == t]
        assert all(i > proc and op.optional for i, op in mine)
        (_, as_dir), (_, as_file), (_, ro) = mine
        assert as_dir.if_dir is True and as_dir.fstype == "tmpfs"
        assert as_dir.flags & ksys.MS_RDONLY and "nr_inodes=1" in (as_dir.data or "")
        assert as_file.if_dir is False and as_file.source == "/dev/null"
        assert as_file.flags == ksys.MS_BIND
        assert ro.if_dir is False and ro.flags & ksys.MS_REMOUNT and ro.flags & ksys.MS_RDONLY
        assert not ro.flags & ksys.MS_NODEV  # /dev/null must open: it reads as empty


def test_device_nodes_are_bound_read_only() -> None:
    for node in ("null", "zero", "full", "random", "urandom", "tty"):
        t = f"{IMG}/dev/{node}"
        remounts = [op for op in _plan() if op.target == t and op.flags & ksys.MS_REMOUNT]
        assert len(remounts) == 1 and remounts[0].flags & ksys.MS_RDONLY, remounts


def test_no_sysfs_and_nothing_below_sys() -> None:
    ops = _plan((*DEFAULT_MOUNTS, Mount("tmpfs", "/tmp"),
                 Mount("bind", "/data", source="/var/lib/agent/data/x")))
    assert not any(op.fstype == "sysfs" or op.target.startswith(f"{IMG}/sys") for op in ops)


@pytest.mark.parametrize("target", ["/sys", "/sys/fs/cgroup", "/proc", "/proc/sys",
                                    "/dev", "/dev/shm"])
@pytest.mark.parametrize("kind", ["tmpfs", "bind"])
def test_no_area_may_cover_proc_sys_or_dev(target: str, kind: str) -> None:
    m = Mount(kind, target, source="/var/lib/agent/data/x" if kind == "bind" else None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as ei:
        check_spec(SpawnSpec(argv=("/x",), rootfs=IMG, mounts=(*DEFAULT_MOUNTS, m),
                             **NOUSERNS))
    assert ei.value.code == "E_SPAWN" and "/proc, /sys or /dev" in ei.value.message


@pytest.mark.parametrize(("kw", "fragment"), [
    ({"uid": 0, "gid": 1000}, "0 is host root"),
    ({"uid": 1000, "gid": 0}, "0 is host root"),
    ({**NOUSERNS, "caps_keep": frozenset({"net_raw", "kill"})}, "net_raw act on the host"),
    ({**NOUSERNS, "caps_keep": frozenset({"CAP_SYS_ADMIN"})}, "sys_admin"),
    ({**NOUSERNS, "no_new_privs": False}, "no_new_privs"),
])
def test_without_userns_host_root_and_host_caps_are_refused(kw: dict[str, Any],
                                                            fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        check_spec(SpawnSpec(argv=("/x",), rootfs=IMG, **kw))
    assert ei.value.code == "E_SPAWN" and fragment in ei.value.message and ei.value.hint
    check_spec(SpawnSpec(argv=("/x",), rootfs=IMG, userns=UidMap(100000), **kw))  # the control


@given(caps=st.sets(st.sampled_from(sorted(ksys.CAPS))), uid=st.integers(0, 3),
       gid=st.integers(0, 3))
def test_without_userns_a_spec_passes_exactly_under_the_rules(caps: set[str], uid: int,
                                                              gid: int) -> None:
    spec = SpawnSpec(argv=("/x",), rootfs=IMG, caps_keep=frozenset(caps), uid=uid, gid=gid)
    ok = uid != 0 and gid != 0 and {ksys.CAPS[c] for c in caps} <= NOUSERNS_KEEPABLE
    try:
        check_spec(spec)
    except ConfigError:
        assert not ok
    else:
        assert ok


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str | None, str, str | None, int]] = []

    def __call__(self, source: str | None, target: str, fstype: str | None, flags: int,
                 data: str | None = None) -> None:
        self.calls.append((source, target, fstype, flags))


def test_the_child_takes_the_masks_alternative_by_the_targets_type(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "proc/acpi").mkdir(parents=True)
    (tmp_path / "proc/kcore").write_text("")
    rec = _Recorder()
    monkeypatch.setattr(spawnchild.libc, "mount", rec)
    ops = [op for op in plan_mounts(str(tmp_path), (Mount("proc", "/proc"),), 1000, 1000, 0)
           if op.fstype != "proc" and op.target.split("/")[-1] in ("acpi", "kcore", "scsi")]
    for op in ops:
        spawnchild._run_mount(op)
    got = [(src, Path(t).name, fs) for src, t, fs, _ in rec.calls]
    assert got == [("tmpfs", "acpi", "tmpfs"), ("/dev/null", "kcore", None),
                   (None, "kcore", None)]  # /proc/scsi is missing here: skipped


def test_a_symlinked_mask_target_is_refused(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/keys").symlink_to("/etc/passwd")
    monkeypatch.setattr(spawnchild.libc, "mount", _Recorder())
    op = next(op for op in plan_mounts(str(tmp_path), (Mount("proc", "/proc"),), 1, 1, 0)
              if op.target.endswith("/keys") and op.source == "/dev/null")
    with pytest.raises(KernelError) as ei:
        spawnchild._run_mount(op)
    assert ei.value.errno == errno.ELOOP


def test_docs_name_every_masked_and_read_only_path() -> None:
    doc = (ROOT / "docs/sandbox.md").read_text()
    masked, ro = _ours()
    for p in sorted(masked | ro):
        assert f"`{p}`" in doc, p
