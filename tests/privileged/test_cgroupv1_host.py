"""The v1 backend on the host's real cgroup-v1 hierarchy (root only).

Each test works in its own subtree ``agent-test-<random>`` in every
hierarchy, and the fixture removes it even when the test fails, then checks
that every hierarchy holds what it held before.  Child processes are this
test's own and are killed and reaped in teardown.
"""

from __future__ import annotations

import errno
import os
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.core.cgroup import Limits
from agent.core.errors import KernelError
from agent.kernel.cgroup import CgroupBackend
from agent.kernel.cgroupdetect import detect
from agent.kernel.cgroupv1 import CONTROLLERS, REQUIRED_CONTROLLERS, CgroupV1

MiB = 1 << 20


class Host:
    def __init__(self, cg: CgroupV1) -> None:
        self.cg = cg
        self.children: list[subprocess.Popen[str]] = []

    def python(self, code: str) -> subprocess.Popen[str]:
        """A child running ``code``; it waits for a line on stdin where it says so."""
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        self.children.append(p)
        return p

    def sleeper(self) -> subprocess.Popen[str]:
        p = subprocess.Popen(["sleep", "300"], text=True)
        self.children.append(p)
        return p


def go(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.write("go\n")
    p.stdin.flush()


def line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    return p.stdout.readline().strip()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def snapshot(hierarchies: dict[str, Path]) -> dict[Path, set[str]]:
    return {p: set(os.listdir(p)) for p in set(hierarchies.values())}


@pytest.fixture
def host() -> Iterator[Host]:
    layout = detect()
    if layout.kind != "v1":
        pytest.skip(f"host has no cgroup-v1 hierarchy ({layout.reason})")
    missing = [c for c in REQUIRED_CONTROLLERS if c not in layout.hierarchies]
    if missing:
        pytest.skip(f"host v1 lacks hierarchies for {', '.join(missing)}")
    hier = {c: p for c, p in layout.hierarchies.items() if c in CONTROLLERS}
    before = snapshot(hier)
    name = f"agent-test-{secrets.token_hex(4)}"
    h = Host(CgroupV1(Path("/sys/fs/cgroup"), name, hierarchies=hier))
    try:
        yield h
    finally:
        problems: list[str] = []
        try:
            for cell in h.cg.list_cells():
                h.cg.kill(cell)
                h.cg.remove(cell)
        except KernelError as exc:
            problems.append(str(exc))
        for p in h.children:
            if p.poll() is None:
                p.kill()
            p.wait()
        for mount in set(hier.values()):
            sub = mount / name
            for d in sorted(sub.glob("*/"), reverse=True):
                try:
                    os.rmdir(d)
                except OSError as exc:
                    problems.append(f"rmdir {d}: {exc}")
            try:
                os.rmdir(sub)
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"rmdir {sub}: {exc}")
        after = snapshot(hier)
        for mount, entries in before.items():
            assert entries <= after[mount], f"{mount} lost {entries - after[mount]}"
            assert name not in after[mount], f"{mount / name} left behind"
        assert not problems, problems


def cell(h: Host, name: str = "c1", limits: Limits | None = None) -> str:
    h.cg.setup()
    h.cg.create(name)
    if limits is not None:
        h.cg.set_limits(name, limits)
    return name


def test_setup_create_and_limits_read_back(host: Host) -> None:
    cg = host.cg
    assert isinstance(cg, CgroupBackend)
    assert {"cpu", "cpuacct", "memory", "pids"} <= cg.setup()
    lim = Limits(cpu_max_millicores=500, cpu_weight=200, memory_min=4 * MiB,
                 memory_high=8 * MiB, memory_max=16 * MiB, pids_max=5, io_weight=300)
    cell(host, "c1", lim)

    def rd(c: str, f: str) -> str:
        return (cg.cell_dir("c1", c) / f).read_text().strip()

    assert rd("cpu", "cpu.cfs_quota_us") == "50000"
    assert rd("cpu", "cpu.cfs_period_us") == "100000"
    assert rd("cpu", "cpu.shares") == "2048"
    assert rd("memory", "memory.soft_limit_in_bytes") == str(8 * MiB)
    assert rd("memory", "memory.limit_in_bytes") == str(16 * MiB)
    assert rd("pids", "pids.max") == "5"
    if "io.weight" in cg.features:
        weight_file = "blkio.weight" if (cg.cell_dir("c1", "blkio") / "blkio.weight").exists() \
            else "blkio.bfq.weight"
        assert rd("blkio", weight_file) == ("1000" if weight_file == "blkio.weight" else "300")
    assert cg.recorded["c1"].memory_min == 4 * MiB
    assert not {"psi", "memory.high", "memory.min", "cgroup.kill"} & cg.features
    # back to no limits: the kernel shows its own "unlimited" values
    cg.set_limits("c1", Limits())
    unlimited = (cg.hierarchies["memory"] / "memory.limit_in_bytes").read_text().strip()
    assert rd("memory", "memory.limit_in_bytes") == unlimited
    assert rd("cpu", "cpu.cfs_quota_us") == "-1"
    assert rd("pids", "pids.max") == "max"
    assert cg.list_cells() == ["c1"]


def test_process_moves_in_and_is_attributed(host: Host) -> None:
    cg = host.cg
    cell(host)
    spin = host.python(
        "import sys, time\nsys.stdin.readline()\nt = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass\nprint('done', flush=True)\n"
        "sys.stdin.readline()\n")
    cg.add_proc("c1", spin.pid)
    assert cg.procs("c1") == [spin.pid]
    assert cg.pid_to_cell(spin.pid) == "c1"
    text = Path(f"/proc/{spin.pid}/cgroup").read_text()
    for c in ("cpu", "cpuacct", "memory", "pids"):
        assert any(c in ln.split(":")[1].split(",") and ln.endswith(f"/{cg.name}/c1")
                   for ln in text.splitlines()), text
    go(spin)
    assert line(spin) == "done"
    st = cg.stats("c1")
    assert st.cpu_usage_usec >= 250_000  # the 0.3 s it spun inside the cell
    assert st.pids_current == 1 and st.pressure == {}
    assert cg.pid_to_cell(os.getpid()) is None


def test_cpu_quota_throttles(host: Host) -> None:
    cell(host, "c1", Limits(cpu_max_millicores=100))
    spin = host.python(
        "import sys, time\nsys.stdin.readline()\nt0, c0 = time.monotonic(), time.process_time()\n"
        "while time.monotonic() - t0 < 1.0: pass\nprint(time.process_time() - c0, flush=True)\n"
        "sys.stdin.readline()\n")
    host.cg.add_proc("c1", spin.pid)
    go(spin)
    used = float(line(spin))
    assert used < 0.3, f"{used:.2f} s of CPU in 1 s under a 0.1-CPU quota"


def test_pids_max_stops_forks(host: Host) -> None:
    cg = host.cg
    cell(host, "c1", Limits(pids_max=3))
    forker = host.python(
        "import errno, os, sys, time\nsys.stdin.readline()\nn = 0\n"
        "for _ in range(10):\n"
        "    try:\n        pid = os.fork()\n"
        "    except OSError as e:\n"
        "        print('EAGAIN' if e.errno == errno.EAGAIN else e.errno, n, flush=True)\n"
        "        break\n"
        "    if pid == 0:\n        time.sleep(300)\n        os._exit(0)\n"
        "    n += 1\nelse:\n    print('no limit', n, flush=True)\nsys.stdin.readline()\n")
    cg.add_proc("c1", forker.pid)
    go(forker)
    assert line(forker) == "EAGAIN 2"
    assert cg.stats("c1").pids_current == 3
    assert len(cg.procs("c1")) == 3
    # kill reaches the grandchildren too, and leaves the cell empty and thawed
    cg.kill("c1")
    assert cg.procs("c1") == []
    assert forker.wait(5) == -9
    if "freeze" in cg.features:
        assert (cg.cell_dir("c1", "freezer") / "freezer.state").read_text().strip() == "THAWED"


def test_memory_limit_holds(host: Host) -> None:
    cg = host.cg
    cell(host, "c1", Limits(memory_max=16 * MiB))
    hog = host.python(
        "import sys\nsys.stdin.readline()\nb = b'x' * (64 << 20)\n"
        "print('survived', len(b), flush=True)\n")
    cg.add_proc("c1", hog.pid)
    go(hog)
    rc = hog.wait(30)
    st = cg.stats("c1")
    peak = int((cg.cell_dir("c1", "memory") / "memory.max_usage_in_bytes").read_text())
    assert peak <= 16 * MiB
    assert st.memory_events["max"] > 0
    assert rc == -9, f"the hog was not OOM-killed (rc {rc})"
    if "oom_kill" in st.memory_events:
        assert st.memory_events["oom_kill"] >= 1


def test_lowering_below_usage_is_refused_not_oom_killed(host: Host) -> None:
    swap = [ln for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("SwapTotal:")]
    if not swap or swap[0].split()[1] != "0":
        pytest.skip("with swap the kernel can reclaim anonymous memory: no EBUSY to show")
    cg = host.cg
    cell(host, "c1", Limits(memory_max=64 * MiB))
    holder = host.python(
        "import sys\nsys.stdin.readline()\nb = b'x' * (32 << 20)\n"
        "print('holding', flush=True)\nsys.stdin.readline()\n")
    cg.add_proc("c1", holder.pid)
    go(holder)
    assert line(holder) == "holding"
    with pytest.raises(KernelError) as e:
        cg.set_limits("c1", Limits(memory_max=8 * MiB))
    assert e.value.errno == errno.EBUSY and "does not OOM-kill" in (e.value.hint or "")
    limit = (cg.cell_dir("c1", "memory") / "memory.limit_in_bytes").read_text().strip()
    assert limit == str(64 * MiB) and holder.poll() is None
    assert cg.stats("c1").memory_events.get("oom_kill", 0) == 0


def test_freeze_stops_and_thaw_resumes(host: Host, tmp_path: Path) -> None:
    cg = host.cg
    cell(host)
    if "freeze" not in cg.features:
        pytest.skip("host has no freezer hierarchy")
    counter = tmp_path / "counter"
    counter.write_text("0")
    ticker = host.python(
        f"import os, sys, time\nfd = os.open({str(counter)!r}, os.O_WRONLY)\n"
        "sys.stdin.readline()\nn = 0\nwhile True:\n    n += 1\n"
        "    os.pwrite(fd, b'%012d' % n, 0)\n    time.sleep(0.005)\n")
    cg.add_proc("c1", ticker.pid)
    go(ticker)

    def count() -> int:
        return int(counter.read_text() or 0)

    assert wait_for(lambda: count() > 5)
    cg.freeze("c1")
    assert (cg.cell_dir("c1", "freezer") / "freezer.state").read_text().strip() == "FROZEN"
    frozen_at = count()
    time.sleep(0.3)
    assert count() == frozen_at
    state = Path(f"/proc/{ticker.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state == "D"  # v1 shows frozen tasks in uninterruptible sleep
    cg.thaw("c1")
    assert wait_for(lambda: count() > frozen_at + 5)
    assert ticker.poll() is None


def test_kill_and_remove_leave_nothing(host: Host) -> None:
    cg = host.cg
    cell(host, "c1", Limits(pids_max=20))
    cell(host, "c2")
    sleepers = [host.sleeper() for _ in range(3)]
    for p in sleepers:
        cg.add_proc("c1", p.pid)
    assert cg.procs("c1") == sorted(p.pid for p in sleepers)
    with pytest.raises(KernelError) as e:
        cg.remove("c1", timeout=0.2)  # busy: processes are still in it
    assert e.value.errno == errno.ETIMEDOUT
    cg.kill("c1")
    assert cg.procs("c1") == [] and all(p.wait(5) == -9 for p in sleepers)
    cg.remove("c1")
    for c in cg.controllers():
        assert not cg.cell_dir("c1", c).exists()
        assert cg.cell_dir("c2", c).is_dir()
    assert cg.list_cells() == ["c2"]
    cg.remove("c1")  # again: a missing cell is fine
    cg.kill("c1")


def test_memory_pressure_eventfd_fires_on_reclaim(host: Host, tmp_path: Path) -> None:
    cg = host.cg
    cell(host, "c1", Limits(memory_max=16 * MiB))
    fd = cg.memory_pressure_fd("c1", "low")
    try:
        assert select.select([fd], [], [], 0.2)[0] == []  # idle: nothing to report
        data = tmp_path / "data"
        writer = host.python(
            f"import os, sys\nsys.stdin.readline()\nf = open({str(data)!r}, 'wb')\n"
            "for i in range(64):\n    f.write(b'x' * (1 << 20))\n"
            "    if i % 4 == 3: f.flush(); os.fsync(f.fileno())\n"  # clean pages: reclaimable
            "f.close()\nprint('written', flush=True)\nsys.stdin.readline()\n")
        cg.add_proc("c1", writer.pid)
        go(writer)
        # 64 MiB of page cache through a 16 MiB memcg: the kernel must reclaim
        assert line(writer) == "written", f"writer died: rc {writer.poll()}"
        assert select.select([fd], [], [], 5.0)[0] == [fd]
        assert int.from_bytes(os.read(fd, 8), "little") >= 1
    finally:
        os.close(fd)
