"""Detecting the cgroup layout from mounts texts, and choosing the backend."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.core.cgroup import ALL_FEATURES
from agent.core.cgroupmode import classify, parse_filesystems, parse_mounts
from agent.core.errors import KernelError
from agent.kernel.cgroupdetect import FEATURE_LOSS, describe, detect, features, open_backend
from agent.kernel.cgroupv1 import CgroupV1
from agent.kernel.cgroupv2 import CgroupV2

# This development host's /proc/self/mounts (a hybrid: v1 controllers, and a cgroup2
# mount at /sys/fs/cgroup/unified whose cgroup.controllers holds only hugetlb).
DEV_HOST = """\
proc /proc proc rw,relatime 0 0
sysfs /sys sysfs rw,relatime 0 0
devtmpfs /dev devtmpfs rw,relatime,size=12334460k,nr_inodes=3083615,mode=755 0 0
/dev/vda / ext4 rw,relatime,discard,resv_strict,resuid=65534,resgid=65534 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/devices cgroup rw,relatime,devices 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0
cgroup /sys/fs/cgroup/blkio cgroup rw,relatime,blkio 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
/dev/vda /run/netns ext4 rw,relatime,discard 0 0
"""

# systemd hybrid (Ubuntu 20.04 style): co-mounted hierarchies, empty unified mount.
SYSTEMD_HYBRID = """\
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,nosuid,nodev,noexec,relatime,xattr,name=systemd 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/net_cls,net_prio cgroup rw,nosuid,nodev,noexec,relatime,net_cls,net_prio 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,nosuid,nodev,noexec,relatime,pids 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,nosuid,nodev,noexec,relatime,freezer 0 0
"""

# A unified-only system (Debian 12, the emulated box).
UNIFIED = """\
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0
"""

# An Android-derived BSP: v1 hierarchies outside /sys/fs/cgroup, cgroup2 only for bpf.
ANDROID_BSP = """\
none /dev/cpuctl cgroup rw,nosuid,nodev,noexec,relatime,cpu 0 0
none /acct cgroup rw,nosuid,nodev,noexec,relatime,cpuacct 0 0
none /dev/memcg cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
none /dev/pids cgroup rw,relatime,pids 0 0
none /dev/freezer cgroup rw,relatime,freezer 0 0
none /dev/cg2_bpf cgroup2 rw,nosuid,nodev,noexec,relatime 0 0
"""

FILESYSTEMS = "nodev\tsysfs\nnodev\tcgroup\nnodev\tcgroup2\n\text4\n"


def ctl(table: dict[str, str]) -> Callable[[Path], frozenset[str]]:
    """The unified mounts' cgroup.controllers, by mount point."""
    return lambda p: frozenset(table.get(str(p), "").split())


def test_parse_mounts_dev_host() -> None:
    mounts = parse_mounts(DEV_HOST)
    assert [m.path.name for m in mounts] == [
        "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids",
        "systemd", "unified"]
    assert mounts[0].controllers == {"cpu"}
    assert mounts[8].controllers == frozenset()  # name=systemd holds no controller
    assert mounts[9].fstype == "cgroup2" and mounts[9].controllers == frozenset()


def test_parse_mounts_unescapes_paths() -> None:
    (m,) = parse_mounts("cgroup /mnt/my\\040cg cgroup rw,memory 0 0\n")
    assert m.path == Path("/mnt/my cg") and m.controllers == {"memory"}


def test_parse_filesystems() -> None:
    assert parse_filesystems(FILESYSTEMS) == {"cgroup", "cgroup2"}
    assert parse_filesystems("nodev\tproc\n\text4\n") == frozenset()


def test_dev_host_is_v1() -> None:
    layout = classify(parse_mounts(DEV_HOST), parse_filesystems(FILESYSTEMS),
                      ctl({"/sys/fs/cgroup/unified": "hugetlb"}))
    assert layout.kind == "v1"
    assert layout.hierarchies["memory"] == Path("/sys/fs/cgroup/memory")
    assert layout.unified == Path("/sys/fs/cgroup/unified")
    assert layout.unified_controllers == {"hugetlb"}
    assert "ignored" in layout.reason and "hugetlb" in layout.reason


def test_systemd_hybrid_is_v1_with_co_mounts() -> None:
    layout = classify(parse_mounts(SYSTEMD_HYBRID), frozenset({"cgroup", "cgroup2"}),
                      ctl({}))
    assert layout.kind == "v1"
    assert layout.hierarchies["cpu"] == layout.hierarchies["cpuacct"] == Path(
        "/sys/fs/cgroup/cpu,cpuacct")
    assert "blkio" not in layout.hierarchies
    assert "none" in layout.reason


def test_unified_is_v2() -> None:
    layout = classify(parse_mounts(UNIFIED), frozenset({"cgroup", "cgroup2"}),
                      ctl({"/sys/fs/cgroup": "cpuset cpu io memory pids"}))
    assert layout.kind == "v2" and layout.unified == Path("/sys/fs/cgroup")
    assert layout.hierarchies == {}


def test_unified_without_required_controllers() -> None:
    # a v1 hierarchy holds memory: the v2 side cannot limit memory, so v1 wins
    text = UNIFIED + "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n"
    layout = classify(parse_mounts(text), frozenset({"cgroup", "cgroup2"}),
                      ctl({"/sys/fs/cgroup": "cpu pids"}))
    assert layout.kind == "v1"
    # no v1 at all: v2 with what it has (setup() then names what is missing)
    layout = classify(parse_mounts(UNIFIED), frozenset({"cgroup2"}),
                      ctl({"/sys/fs/cgroup": "cpu pids"}))
    assert layout.kind == "v2" and "only" in layout.reason


def test_android_bsp_is_v1_outside_sys() -> None:
    layout = classify(parse_mounts(ANDROID_BSP), frozenset({"cgroup", "cgroup2"}),
                      ctl({}))
    assert layout.kind == "v1"
    assert layout.hierarchies == {"cpu": Path("/dev/cpuctl"), "cpuacct": Path("/acct"),
                                  "memory": Path("/dev/memcg"), "pids": Path("/dev/pids"),
                                  "freezer": Path("/dev/freezer")}


def test_nothing_mounted_is_none() -> None:
    layout = classify(parse_mounts("proc /proc proc rw 0 0\n"), frozenset({"cgroup2"}),
                      ctl({}))
    assert layout.kind == "none" and "cgroup2" in layout.reason
    empty_unified = classify(parse_mounts(UNIFIED), frozenset({"cgroup2"}),
                             ctl({}))
    assert empty_unified.kind == "none"


def fake_proc(tmp_path: Path, mounts: str) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self/mounts").write_text(mounts)
    (proc / "filesystems").write_text(FILESYSTEMS)
    return proc


def test_detect_and_open_v1_on_a_fake_tree(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    both = root / "cpu,cpuacct"
    lines = [f"cgroup {both} cgroup rw,cpu,cpuacct 0 0"]
    for c in ("memory", "pids", "freezer"):
        (root / c).mkdir(parents=True)
        lines.append(f"cgroup {root / c} cgroup rw,nosuid,{c} 0 0")
    both.mkdir()
    (root / "unified").mkdir()
    (root / "unified/cgroup.controllers").write_text("hugetlb\n")
    lines.append(f"cgroup2 {root / 'unified'} cgroup2 rw 0 0")
    proc = fake_proc(tmp_path, "\n".join(lines) + "\n")
    layout = detect(proc)
    assert layout.kind == "v1" and layout.unified_controllers == {"hugetlb"}
    cg = open_backend(root / "agent", proc)
    assert isinstance(cg, CgroupV1)
    assert cg.hierarchies["cpu"] == both and cg.name == "agent"
    assert cg.setup() == {"cpu", "cpuacct", "memory", "pids", "freezer"}
    assert (both / "agent").is_dir() and (root / "freezer/agent").is_dir()
    assert features(cg) == {"freeze"}


def test_open_v2_on_a_fake_tree(tmp_path: Path) -> None:
    mount = tmp_path / "cg"
    (mount / "agent").mkdir(parents=True)
    (mount / "cgroup.controllers").write_text("cpu io memory pids\n")
    (mount / "agent/cgroup.subtree_control").write_text("+cpu +memory +pids +io")
    for f in ("cgroup.kill", "cgroup.freeze", "cpu.pressure"):
        (mount / "agent" / f).write_text("")
    proc = fake_proc(tmp_path, f"cgroup2 {mount} cgroup2 rw,nsdelegate 0 0\n")
    cg = open_backend(mount / "agent", proc)
    assert isinstance(cg, CgroupV2) and cg.mount == mount and cg.prefix == "/agent"
    assert features(cg) == {"psi", "cgroup.kill", "freeze", "io.weight", "memory.high",
                            "memory.min"}


def test_open_none_raises(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "proc /proc proc rw 0 0\n")
    with pytest.raises(KernelError) as e:
        open_backend(Path("/sys/fs/cgroup/agent"), proc)
    assert e.value.errno == errno.ENOENT and "mount cgroup2" in (e.value.hint or "")


def test_detect_missing_proc(tmp_path: Path) -> None:
    with pytest.raises(KernelError) as e:
        detect(tmp_path)
    assert e.value.op == "read" and e.value.errno == errno.ENOENT


def test_detect_this_host() -> None:
    """The live kernel: the answer must agree with what the filesystem shows."""
    layout = detect()
    unified = Path("/sys/fs/cgroup/cgroup.controllers")
    if unified.exists() and {"cpu", "memory", "pids"} <= set(unified.read_text().split()):
        assert layout.kind == "v2"
    elif Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
        assert layout.kind == "v1"
        assert layout.hierarchies["memory"] == Path("/sys/fs/cgroup/memory")
        assert isinstance(open_backend(Path("/sys/fs/cgroup/agent")), CgroupV1)
    else:
        pytest.skip("this host mounts cgroups in an unusual place")


def test_describe() -> None:
    v1 = classify(parse_mounts(DEV_HOST), frozenset({"cgroup", "cgroup2"}),
                  ctl({}))
    text = describe(v1, frozenset({"freeze"}))
    assert text.startswith("cgroup layout: v1")
    for f in ALL_FEATURES:
        assert (FEATURE_LOSS[f] in text) == (f != "freeze")
    v2 = classify(parse_mounts(UNIFIED), frozenset({"cgroup2"}),
                  ctl({"/sys/fs/cgroup": "cpu memory pids io"}))
    assert "nothing degrades" in describe(v2, frozenset(ALL_FEATURES))
    assert "no psi" in describe(v2, frozenset(ALL_FEATURES) - {"psi"})
    none = classify([], frozenset(), ctl({}))
    assert describe(none) == "cgroup layout: none (no cgroup controllers are mounted " \
        "(kernel supports no cgroup filesystem))"
