"""The v1 backend against a fake v1 tree in tmp_path.

The fake is plain directories and files: it shows what the backend writes
where, the v2 -> v1 mappings and the error paths.  Kernel semantics (limits
biting, freezing, killing) are shown on the host's real v1 hierarchy in
tests/privileged/test_cgroupv1_host.py.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.cgroup import Limits
from agent.core.cgroupv1map import (
    bfq_weight,
    blkio_weight,
    cell_from_proc_cgroup_v1,
    cfs_quota_us,
    cpu_shares,
    degraded_limits,
    v1_files,
)
from agent.core.errors import ConfigError, KernelError
from agent.kernel.cgroup import CgroupBackend
from agent.kernel.cgroupv1 import CONTROLLERS, CgroupV1

UNLIMITED = "9223372036854771712\n"

CELL_FILES = {
    "cpu": {"cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n",
            "cpu.shares": "1024\n"},
    "cpuacct": {"cpuacct.usage": "123456789\n"},
    "memory": {"memory.limit_in_bytes": UNLIMITED, "memory.soft_limit_in_bytes": UNLIMITED,
               "memory.memsw.limit_in_bytes": UNLIMITED, "memory.usage_in_bytes": "8192\n",
               "memory.failcnt": "7\n", "memory.force_empty": "",
               "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"},
    "pids": {"pids.max": "max\n", "pids.current": "3\n"},
    "blkio": {"blkio.weight": "500\n"},
    "freezer": {"freezer.state": "THAWED\n"},
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def sleep(self, dt: float) -> None:
        self.now += dt


@pytest.fixture
def fs(tmp_path: Path) -> Path:
    """A v1 mount root: one directory per hierarchy, as the kernel shows a root."""
    root = tmp_path / "cgroup"
    for c in CONTROLLERS:
        (root / c).mkdir(parents=True)
        (root / c / "cgroup.procs").write_text("1\n")
    (root / "memory/memory.use_hierarchy").write_text("1\n")
    return root


def populate(cg: CgroupV1, cell: str, skip: tuple[str, ...] = ()) -> None:
    """What the kernel would show in a new cell directory."""
    for c in cg.controllers():
        d = cg.cell_dir(cell, c)
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.procs").write_text("")
        for name, text in CELL_FILES[c].items():
            if name not in skip:
                (d / name).write_text(text)


def backend(fs: Path, **kw: object) -> tuple[CgroupV1, FakeClock, list[tuple[int, int, str]]]:
    clock = FakeClock()
    killed: list[tuple[int, int, str]] = []

    def kill_fn(pid: int, sig: int) -> None:
        # a fake SIGKILL: record the freezer state it saw, drop the pid everywhere
        states = [p.read_text().strip() for p in fs.rglob("freezer.state")]
        killed.append((pid, sig, ",".join(states)))
        for procs in fs.rglob("cgroup.procs"):
            pids = procs.read_text().split()
            if str(pid) in pids:
                procs.write_text("\n".join(p for p in pids if p != str(pid)))

    cg = CgroupV1(fs, "agent", kill_fn=kill_fn, sleep=clock.sleep, clock=clock.time,
                  **kw)  # type: ignore[arg-type]
    return cg, clock, killed


def ready(fs: Path, cell: str = "web", **kw: object) -> CgroupV1:
    cg = backend(fs, **kw)[0]
    cg.setup()
    (cg.subtree("blkio") / "blkio.weight").write_text("500\n")
    cg.create(cell)
    populate(cg, cell)
    return cg


def test_is_a_backend(fs: Path) -> None:
    cg = backend(fs)[0]
    assert isinstance(cg, CgroupBackend)
    assert cg.root == fs / "memory" / "agent"


def test_setup_creates_subtree_in_every_hierarchy(fs: Path) -> None:
    cg = backend(fs)[0]
    assert cg.setup() == frozenset(CONTROLLERS)
    for c in CONTROLLERS:
        assert (fs / c / "agent").is_dir()
    assert cg.features == frozenset({"freeze"})  # no blkio weight file in the fake
    (cg.subtree("blkio") / "blkio.bfq.weight").write_text("100\n")
    assert cg.setup() and cg.features == frozenset({"freeze", "io.weight"})


def test_setup_turns_on_hierarchical_accounting(fs: Path) -> None:
    (fs / "memory/agent").mkdir()
    (fs / "memory/agent/memory.use_hierarchy").write_text("0\n")
    backend(fs)[0].setup()
    assert (fs / "memory/agent/memory.use_hierarchy").read_text() == "1"


def test_setup_refuses_missing_required_hierarchy(fs: Path) -> None:
    for p in (fs / "pids").iterdir():
        p.unlink()
    (fs / "pids").rmdir()
    with pytest.raises(KernelError) as e:
        backend(fs)[0].setup()
    assert e.value.errno == errno.EOPNOTSUPP and "pids" in (e.value.hint or "")


def test_optional_hierarchies_missing(fs: Path) -> None:
    for c in ("blkio", "freezer"):
        for p in (fs / c).iterdir():
            p.unlink()
        (fs / c).rmdir()
    cg = backend(fs)[0]
    assert cg.setup() == frozenset({"cpu", "cpuacct", "memory", "pids"})
    assert cg.features == frozenset()
    populate(cg, "web")
    cg.set_limits("web", Limits(io_weight=800))  # skipped: degraded, not an error
    with pytest.raises(KernelError) as e:
        cg.freeze("web")
    assert e.value.errno == errno.EOPNOTSUPP


def test_set_limits_writes_v1_files(fs: Path) -> None:
    cg = ready(fs)
    lim = Limits(cpu_max_millicores=250, cpu_weight=50, memory_min=1 << 20,
                 memory_high=8 << 20, memory_max=16 << 20, pids_max=20, io_weight=300,
                 cpu_period_us=200_000)
    cg.set_limits("web", lim)

    def rd(c: str, name: str) -> str:
        return (cg.cell_dir("web", c) / name).read_text()

    assert rd("cpu", "cpu.cfs_period_us") == "200000"
    assert rd("cpu", "cpu.cfs_quota_us") == "50000"
    assert rd("cpu", "cpu.shares") == "512"
    assert rd("memory", "memory.memsw.limit_in_bytes") == "-1"
    assert rd("memory", "memory.soft_limit_in_bytes") == str(8 << 20)
    assert rd("memory", "memory.limit_in_bytes") == str(16 << 20)
    assert rd("pids", "pids.max") == "20"
    assert rd("blkio", "blkio.weight") == "1000"
    assert cg.recorded["web"] == lim  # memory_min: recorded, no file
    assert not any(p.name.startswith("memory.min") for p in cg.cell_dir("web", "memory").iterdir())
    cg.set_limits("web", Limits())
    assert rd("cpu", "cpu.cfs_quota_us") == "-1"
    assert rd("memory", "memory.limit_in_bytes") == "-1"
    assert rd("memory", "memory.soft_limit_in_bytes") == "-1"
    assert rd("pids", "pids.max") == "max"
    assert rd("blkio", "blkio.weight") == "500"


def test_set_limits_without_swap_accounting(fs: Path) -> None:
    cg = ready(fs)
    (cg.cell_dir("web", "memory") / "memory.memsw.limit_in_bytes").unlink()
    cg.set_limits("web", Limits(memory_max=1 << 20))
    assert not (cg.cell_dir("web", "memory") / "memory.memsw.limit_in_bytes").exists()


def test_write_error_names_file_and_errno(fs: Path) -> None:
    cg = ready(fs)
    (cg.cell_dir("web", "cpu") / "cpu.cfs_quota_us").unlink()  # no CONFIG_CFS_BANDWIDTH
    with pytest.raises(KernelError) as e:
        cg.set_limits("web", Limits(cpu_max_millicores=100))
    assert e.value.errno == errno.ENOENT and e.value.op == "write"
    assert e.value.target == str(cg.cell_dir("web", "cpu") / "cpu.cfs_quota_us")
    assert "CONFIG_CFS_BANDWIDTH" in (e.value.hint or "")
    assert "web" not in cg.recorded


def test_stats(fs: Path) -> None:
    cg = ready(fs)
    st_ = cg.stats("web")
    assert st_.cpu_usage_usec == 123456
    assert st_.memory_current == 8192
    assert st_.memory_events == {"max": 7, "oom_kill": 2}
    assert st_.pids_current == 3
    assert st_.pressure == {}
    # kernels before 4.13 have no oom_kill counter: the key is absent, not 0
    (cg.cell_dir("web", "memory") / "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\n")
    assert cg.stats("web").memory_events == {"max": 7}


def test_stats_errors(fs: Path) -> None:
    cg = ready(fs)
    (cg.cell_dir("web", "pids") / "pids.current").write_text("lots\n")
    with pytest.raises(KernelError) as e:
        cg.stats("web")
    assert e.value.op == "parse" and e.value.target.endswith("pids/agent/web/pids.current")
    (cg.cell_dir("web", "cpuacct") / "cpuacct.usage").unlink()
    with pytest.raises(KernelError) as e:
        cg.stats("web")
    assert e.value.op == "read" and e.value.errno == errno.ENOENT


def test_procs_add_proc_and_co_mounted_hierarchies(tmp_path: Path) -> None:
    both = tmp_path / "cpu,cpuacct"
    hier = {"cpu": both, "cpuacct": both}
    for c in ("memory", "pids", "freezer"):
        hier[c] = tmp_path / c
    for p in hier.values():
        p.mkdir(exist_ok=True)
    cg = CgroupV1(tmp_path, "agent", hierarchies=hier)
    assert cg.setup() == frozenset({"cpu", "cpuacct", "memory", "pids", "freezer"})
    cg.create("web")
    assert cg.dirs("web") == [both / "agent/web", tmp_path / "memory/agent/web",
                              tmp_path / "pids/agent/web", tmp_path / "freezer/agent/web"]
    for d in cg.dirs("web"):
        (d / "cgroup.procs").write_text("")
    cg.add_proc("web", 4242)
    for d in cg.dirs("web"):
        assert (d / "cgroup.procs").read_text() == "4242"
    (tmp_path / "pids/agent/web/cgroup.procs").write_text("4242\n77\n")
    assert cg.procs("web") == [77, 4242]


def test_procs_of_missing_cell(fs: Path) -> None:
    cg = ready(fs)
    with pytest.raises(KernelError) as e:
        cg.procs("nope")
    assert e.value.errno == errno.ENOENT


def test_create_inherits_cpuset_when_co_mounted(tmp_path: Path) -> None:
    cpu = tmp_path / "cpu,cpuset"
    hier = {"cpu": cpu, "cpuacct": tmp_path / "cpuacct", "memory": tmp_path / "memory",
            "pids": tmp_path / "pids"}
    for p in hier.values():
        p.mkdir()
    (cpu / "cpuset.cpus").write_text("0-3\n")
    (cpu / "cpuset.mems").write_text("0\n")
    (cpu / "agent").mkdir()
    for name in ("cpuset.cpus", "cpuset.mems"):
        (cpu / "agent" / name).write_text("\n")  # what the kernel shows in a new cpuset
    CgroupV1(tmp_path, "agent", hierarchies=hier).setup()
    assert (cpu / "agent/cpuset.cpus").read_text() == "0-3"
    assert (cpu / "agent/cpuset.mems").read_text() == "0"


def test_freeze_and_thaw(fs: Path) -> None:
    cg = ready(fs)
    cg.freeze("web")
    assert (cg.cell_dir("web", "freezer") / "freezer.state").read_text() == "FROZEN"
    cg.thaw("web")
    assert (cg.cell_dir("web", "freezer") / "freezer.state").read_text() == "THAWED"


def test_freeze_timeout_cancels(fs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cg, clock, _ = backend(fs)
    cg.setup()
    populate(cg, "web")
    # a task in D state keeps the cgroup FREEZING (the fake file cannot show that)
    monkeypatch.setattr(cg, "_freezer_state", lambda cell: "FREEZING")
    with pytest.raises(KernelError) as e:
        cg.freeze("web", timeout=1.0)
    assert e.value.errno == errno.ETIMEDOUT and clock.now >= 1.0
    assert (cg.cell_dir("web", "freezer") / "freezer.state").read_text() == "THAWED"


def test_kill_freezes_signals_thaws(fs: Path) -> None:
    cg, _, killed = backend(fs)
    cg.setup()
    populate(cg, "web")
    for d in cg.dirs("web"):
        (d / "cgroup.procs").write_text("11\n12\n")
    cg.kill("web")
    assert killed == [(11, signal.SIGKILL, "FROZEN"), (12, signal.SIGKILL, "FROZEN")]
    assert cg.procs("web") == []
    assert (cg.cell_dir("web", "freezer") / "freezer.state").read_text() == "THAWED"
    cg.kill("gone")  # a missing cell is fine


def test_kill_without_freezer_times_out_on_unkillable(fs: Path) -> None:
    hier = {c: fs / c for c in ("cpu", "cpuacct", "memory", "pids")}
    clock = FakeClock()
    sent: list[int] = []
    cg = CgroupV1(fs, "agent", hierarchies=hier, kill_fn=lambda pid, sig: sent.append(pid),
                  sleep=clock.sleep, clock=clock.time)
    cg.setup()
    populate(cg, "web")
    (cg.cell_dir("web", "memory") / "cgroup.procs").write_text("99\n")
    with pytest.raises(KernelError) as e:
        cg.kill("web", timeout=0.5)
    assert e.value.errno == errno.ETIMEDOUT and "D state" in (e.value.hint or "")
    assert len(sent) > 1 and set(sent) == {99}  # swept again and again


def test_remove_every_hierarchy_and_idempotence(fs: Path) -> None:
    cg = backend(fs)[0]
    cg.setup()
    cg.create("web")
    cg.create("db")
    assert cg.list_cells() == ["db", "web"]
    cg.remove("web")
    for c in CONTROLLERS:
        assert not (fs / c / "agent/web").exists()
        assert (fs / c / "agent/db").is_dir()
    cg.remove("web")
    assert cg.list_cells() == ["db"]


def test_remove_reports_first_error_after_trying_all(fs: Path) -> None:
    cg = ready(fs)  # populated: the fake directories hold files, rmdir says ENOTEMPTY
    with pytest.raises(KernelError) as e:
        cg.remove("web")
    assert e.value.errno == errno.ENOTEMPTY and "child cgroups" in (e.value.hint or "")
    assert (cg.cell_dir("web", "memory") / "memory.force_empty").read_text() == "0"


def test_list_cells_union_and_names(fs: Path) -> None:
    cg = backend(fs)[0]
    with pytest.raises(KernelError) as e:
        cg.list_cells()
    assert e.value.errno == errno.ENOENT
    cg.setup()
    (fs / "pids/agent/half").mkdir()  # a crash between two mkdirs
    (fs / "memory/agent/Not_A_Cell").mkdir()
    (fs / "memory/agent/notes.txt").write_text("x")
    assert cg.list_cells() == ["half"]


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "", "-x", "UPPER"])
def test_cell_names_cannot_escape(fs: Path, bad: str) -> None:
    with pytest.raises(ConfigError):
        backend(fs)[0].create(bad)


def test_subtree_name_checked(fs: Path) -> None:
    with pytest.raises(ConfigError):
        CgroupV1(fs, "../etc")
    assert CgroupV1(fs, "agent/nested").prefix == "/agent/nested"


def test_pid_to_cell(fs: Path, tmp_path: Path) -> None:
    cg = backend(fs)[0]
    proc = tmp_path / "proc"
    for pid, text in {
        10: "4:memory:/agent/web\n1:cpu:/agent/web\n0::/\n",
        11: "5:memory:/agent/web/sub\n",
        12: "4:memory:/agent-master\n",
        13: "8:pids:/agent/web\n4:memory:/\n0::/agent/web\n",
        14: "4:memory:/agent\n",
        15: "9:name=systemd:/agent/web\n3:cpu,cpuacct,memory:/agent/db\n",
    }.items():
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text(text)
    assert cg.pid_to_cell(10, proc) == "web"
    assert cg.pid_to_cell(11, proc) == "web"
    assert cg.pid_to_cell(12, proc) is None
    assert cg.pid_to_cell(13, proc) is None
    assert cg.pid_to_cell(14, proc) is None
    assert cg.pid_to_cell(15, proc) == "db"
    assert cg.pid_to_cell(99, proc) is None
    assert cg.pid_to_cell(os.getpid()) is None  # the real /proc: not in a cell


# -- mappings --------------------------------------------------------------------------


def test_mapping_fixed_points() -> None:
    assert cpu_shares(100) == 1024 and cpu_shares(1) == 10 and cpu_shares(10000) == 102400
    assert blkio_weight(100) == 500 and blkio_weight(1) == 10 and blkio_weight(10000) == 1000
    assert bfq_weight(100) == 100 and bfq_weight(5000) == 1000
    assert cfs_quota_us(Limits()) == -1
    assert cfs_quota_us(Limits(cpu_max_millicores=1500)) == 150_000
    assert cfs_quota_us(Limits(cpu_max_millicores=1)) == 1000  # the kernel's 1 ms minimum


weights = st.integers(min_value=1, max_value=10000)


@given(weights, weights)
def test_weight_mappings_monotonic_and_in_range(a: int, b: int) -> None:
    lo, hi = min(a, b), max(a, b)
    assert 2 <= cpu_shares(lo) <= cpu_shares(hi) <= 262144
    assert 10 <= blkio_weight(lo) <= blkio_weight(hi) <= 1000
    assert 1 <= bfq_weight(lo) <= bfq_weight(hi) <= 1000


@given(st.integers(min_value=1, max_value=64_000), st.integers(min_value=1000, max_value=1_000_000))
def test_quota_matches_cpu_max(mc: int, period: int) -> None:
    lim = Limits(cpu_max_millicores=mc, cpu_period_us=period)
    quota = cfs_quota_us(lim)
    assert f"{quota} {period}" == lim.cpu_max_line()
    assert quota == max(1000, mc * period // 1000)


@given(st.booleans(), st.sampled_from([None, "blkio.weight", "blkio.bfq.weight"]))
def test_v1_files_order(memsw: bool, io: str | None) -> None:
    names = [f for _, f, _ in v1_files(Limits(memory_max=1 << 20), io_file=io, memsw=memsw)]
    assert names.index("cpu.cfs_period_us") < names.index("cpu.cfs_quota_us")
    assert names.index("memory.soft_limit_in_bytes") < names.index("memory.limit_in_bytes")
    if memsw:
        assert names.index("memory.memsw.limit_in_bytes") < names.index("memory.limit_in_bytes")
    assert ("memory.memsw.limit_in_bytes" in names) == memsw
    assert (io in names) if io else not any(n.startswith("blkio") for n in names)


def test_degraded_limits() -> None:
    assert degraded_limits(Limits(), frozenset()) == {}
    d = degraded_limits(Limits(memory_min=1, memory_high=2, memory_max=3, io_weight=200),
                        frozenset())
    assert set(d) == {"memory_min", "memory_high", "io_weight"}
    full = frozenset({"memory.min", "memory.high", "io.weight"})
    assert degraded_limits(Limits(memory_min=1, memory_high=2, io_weight=200), full) == {}


@given(st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,20}", fullmatch=True))
def test_proc_cgroup_v1_round_trip(cell: str) -> None:
    text = f"7:pids:/x\n4:memory:/agent/{cell}/inner\n0::/\n"
    assert cell_from_proc_cgroup_v1(text, "/agent") == cell
    assert cell_from_proc_cgroup_v1(text, "/agent", controller="pids") is None


def test_memory_pressure_fd_registers(fs: Path) -> None:
    cg = ready(fs)
    mem = cg.cell_dir("web", "memory")
    (mem / "memory.pressure_level").write_text("")
    (mem / "cgroup.event_control").write_text("")
    fd = cg.memory_pressure_fd("web", "critical")
    try:
        efd, pfd, level = (mem / "cgroup.event_control").read_text().split()
        assert int(efd) == fd and int(pfd) >= 0 and level == "critical"
    finally:
        os.close(fd)
    with pytest.raises(ConfigError):
        cg.memory_pressure_fd("web", "panic")
    (mem / "memory.pressure_level").unlink()
    with pytest.raises(KernelError) as e:
        cg.memory_pressure_fd("web")
    assert e.value.op == "open" and e.value.errno == errno.ENOENT
