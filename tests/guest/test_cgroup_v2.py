"""The cgroup v2 backend on the box's real kernel: limits really bite.

Each test works in a subtree of its own (``/sys/fs/cgroup/agt-<hex>``) and
removes it; the module checks that the hierarchy is as before at the end.
"""

from __future__ import annotations

import errno
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cellkit import cgroup_v2_subtree

from agent.core.cgroup import Limits
from agent.core.errors import KernelError
from agent.kernel.cgroupv2 import CgroupV2

__all__ = ["cgroup_v2_subtree"]  # the fixture ``cg``, imported for use here

MOUNT = Path("/sys/fs/cgroup")
MiB = 1 << 20


def top_level() -> set[str]:
    return {p.name for p in MOUNT.iterdir() if p.is_dir()}


@pytest.fixture(scope="module", autouse=True)
def hierarchy_unchanged() -> Iterator[None]:
    before = top_level()
    yield
    assert top_level() == before


def spawn_in(cg: CgroupV2, cell: str, code: str) -> subprocess.Popen[str]:
    """Start Python running ``code`` inside the cell: it waits on stdin until
    it has been moved into the cgroup, so nothing it does escapes the limits."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline()\n" + code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cg.add_proc(cell, proc.pid)
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc


def test_setup_enables_controllers_for_cells(cg: CgroupV2) -> None:
    assert {"cpu", "memory", "pids", "io"} <= cg.controllers()
    enabled = set((cg.root / "cgroup.subtree_control").read_text().split())
    assert {"cpu", "memory", "pids", "io"} <= enabled
    leaf = cg.create("web")
    assert (leaf / "cpu.max").exists() and (leaf / "memory.max").exists()
    assert (leaf / "pids.max").exists() and (leaf / "io.weight").exists()


def test_limits_read_back(cg: CgroupV2) -> None:
    leaf = cg.create("web")
    cg.set_limits("web", Limits(cpu_max_millicores=250, cpu_weight=50, memory_min=4 * MiB,
                                memory_high=48 * MiB, memory_max=64 * MiB, pids_max=32,
                                io_weight=300))
    assert (leaf / "cpu.max").read_text().split() == ["25000", "100000"]
    assert (leaf / "cpu.weight").read_text().strip() == "50"
    assert int((leaf / "memory.min").read_text()) == 4 * MiB
    assert int((leaf / "memory.high").read_text()) == 48 * MiB
    assert int((leaf / "memory.max").read_text()) == 64 * MiB
    assert (leaf / "pids.max").read_text().strip() == "32"
    assert (leaf / "io.weight").read_text().split() == ["default", "300"]
    cg.set_limits("web", Limits())
    assert (leaf / "memory.max").read_text().strip() == "max"
    assert (leaf / "cpu.max").read_text().split() == ["max", "100000"]


def test_kernel_rejects_bad_value_with_kernel_error(cg: CgroupV2) -> None:
    leaf = cg.create("web")
    with pytest.raises(KernelError) as e:
        cg._write(leaf / "cpu.weight", "0")  # the kernel range is 1..10000
    assert e.value.errno == errno.ERANGE or e.value.errno == errno.EINVAL
    assert str(leaf / "cpu.weight") in e.value.target


def _until(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for ``cond`` (a loaded host makes the box slow: a bound, not a speed)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def test_process_lifecycle_stats_freeze_kill_remove(cg: CgroupV2) -> None:
    cg.create("web")
    tick = Path(f"/tmp/agt-tick-{secrets.token_hex(3)}")
    proc = spawn_in(cg, "web",
                    "import time\n"
                    f"n = 0\n"
                    f"while True:\n"
                    f"    n += 1\n"
                    f"    open('{tick}', 'w').write(str(n))\n"
                    f"    time.sleep(0.01)\n")
    try:
        assert cg.procs("web") == [proc.pid]
        assert cg.pid_to_cell(proc.pid) == "web"
        assert cg.pid_to_cell(os.getpid()) is None
        _until(lambda: tick.exists() and int(tick.read_text() or 0) > 2, "the child ticking")
        stats = cg.stats("web")
        assert stats.pids_current == 1
        assert stats.memory_current > 0
        assert stats.cpu_usage_usec > 0
        assert {"cpu", "memory", "io"} <= set(stats.pressure)

        cg.freeze("web")
        assert "frozen 1" in (cg.leaf("web") / "cgroup.events").read_text()
        time.sleep(0.1)
        frozen_at = tick.read_text()
        time.sleep(0.5)
        assert tick.read_text() == frozen_at  # nothing ran while frozen
        cg.thaw("web")
        _until(lambda: tick.read_text() != frozen_at, "the child ticking again after thaw")

        with pytest.raises(KernelError) as e:  # busy: bounded wait, then an error
            cg.remove("web", timeout=0.3)
        assert e.value.op == "rmdir"

        cg.kill("web")
        assert proc.wait(timeout=5) == -9
        assert cg.procs("web") == []
        cg.remove("web")
        assert "web" not in cg.list_cells()
        assert not cg.leaf("web").exists()
        cg.remove("web")  # idempotent
    finally:
        proc.kill()
        proc.wait()
        tick.unlink(missing_ok=True)


def test_kill_reaches_grandchildren(cg: CgroupV2) -> None:
    cg.create("web")
    proc = spawn_in(cg, "web",
                    "import subprocess, time\n"
                    "ps = [subprocess.Popen(['sleep', '1000']) for _ in range(3)]\n"
                    "print('up', flush=True)\n"
                    "time.sleep(1000)\n")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "up"
    pids = cg.procs("web")
    assert len(pids) == 4
    cg.kill("web")
    assert proc.wait(timeout=5) == -9
    for pid in pids:
        # gone, or a zombie waiting for init; no longer in the cell either way
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        assert state in ("Z", "X")
    cg.remove("web")


def test_pids_max_stops_forks(cg: CgroupV2) -> None:
    cg.create("web")
    cg.set_limits("web", Limits(pids_max=5))
    proc = spawn_in(cg, "web",
                    "import os, time, errno\n"
                    "ok = 0\n"
                    "for _ in range(20):\n"
                    "    try:\n"
                    "        pid = os.fork()\n"
                    "    except OSError as e:\n"
                    "        print('refused', errno.errorcode[e.errno], flush=True)\n"
                    "        break\n"
                    "    if pid == 0:\n"
                    "        time.sleep(1000)\n"
                    "        os._exit(0)\n"
                    "    ok += 1\n"
                    "print('forked', ok, flush=True)\n"
                    "time.sleep(1000)\n")
    assert proc.stdout is not None
    assert proc.stdout.readline().split() == ["refused", "EAGAIN"]
    assert proc.stdout.readline().split() == ["forked", "4"]  # 1 + 4 = pids.max
    assert cg.stats("web").pids_current == 5
    events = (cg.leaf("web") / "pids.events").read_text().split()
    assert events[0] == "max" and int(events[1]) >= 1
    cg.kill("web")
    proc.wait(timeout=5)
    cg.remove("web")


def test_memory_max_is_enforced(cg: CgroupV2) -> None:
    cg.create("hog")
    cg.set_limits("hog", Limits(memory_max=32 * MiB))
    proc = spawn_in(cg, "hog",
                    "chunks = []\n"
                    "for i in range(128):\n"
                    "    chunks.append(bytearray(b'x' * (1 << 20)))\n"
                    "    print(i, flush=True)\n"
                    "print('survived', flush=True)\n")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -9, out[-200:]
    assert "survived" not in out
    last = int(out.split()[-1])
    assert 8 < last < 32  # it got some memory, and less than the limit
    events = cg.stats("hog").memory_events
    assert events["max"] >= 1
    assert events["oom_kill"] >= 1
    cg.remove("hog")
