"""The v2 backend against a fake cgroupfs in tmp_path.

The fake is plain files: it shows what the backend writes where, and how it
handles errors.  It cannot show kernel semantics (limits biting, freezing,
killing); tests/guest/test_cgroup_v2.py does that on a real kernel.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.cgroup import Limits, cell_from_proc_cgroup, parse_flat_keyed, parse_pressure
from agent.core.errors import ConfigError, KernelError
from agent.core.names import check_cell_name
from agent.kernel.cgroup import CgroupBackend
from agent.kernel.cgroupv2 import CgroupV2

LEAF_FILES = {
    "cgroup.procs": "",
    "cgroup.events": "populated 0\nfrozen 0\n",
    "cgroup.freeze": "0\n",
    "cgroup.kill": "",
    "cpu.max": "max 100000\n",
    "cpu.weight": "100\n",
    "cpu.stat": "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n",
    "cpu.pressure": "some avg10=1.50 avg60=0.25 avg300=0.00 total=777\n"
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=5\n",
    "memory.min": "0\n",
    "memory.high": "max\n",
    "memory.max": "max\n",
    "memory.current": "4096\n",
    "memory.events": "low 0\nhigh 3\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\n",
    "memory.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    "pids.max": "max\n",
    "pids.current": "2\n",
    "io.weight": "default 100\n",
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def sleep(self, dt: float) -> None:
        self.now += dt


def populate(path: Path, skip: tuple[str, ...] = ()) -> None:
    path.mkdir(exist_ok=True)
    for name, text in LEAF_FILES.items():
        if name not in skip:
            (path / name).write_text(text)


@pytest.fixture
def fs(tmp_path: Path) -> Path:
    mount = tmp_path / "cgroup"
    mount.mkdir()
    (mount / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (mount / "cgroup.subtree_control").write_text("")
    (mount / "cgroup.procs").write_text("1\n")
    agent = mount / "agent"
    agent.mkdir()
    (agent / "cgroup.subtree_control").write_text("")
    (agent / "cgroup.procs").write_text("")
    return mount


def backend(fs: Path, **kw: object) -> tuple[CgroupV2, FakeClock, list[tuple[int, int]]]:
    clock = FakeClock()
    killed: list[tuple[int, int]] = []

    def kill_fn(pid: int, sig: int) -> None:
        # a fake kill: drop the pid from whichever fake cgroup.procs holds it
        killed.append((pid, sig))
        for procs in fs.rglob("cgroup.procs"):
            pids = procs.read_text().split()
            if str(pid) in pids:
                procs.write_text("\n".join(p for p in pids if p != str(pid)))

    cg = CgroupV2(fs / "agent", kill_fn=kill_fn, sleep=clock.sleep, clock=clock.time,
                  **kw)  # type: ignore[arg-type]
    return cg, clock, killed


def test_is_a_backend(fs: Path) -> None:
    assert isinstance(backend(fs)[0], CgroupBackend)


def test_setup_enables_controllers_in_parent_and_root(fs: Path) -> None:
    cg, _, _ = backend(fs)
    enabled = cg.setup()
    assert enabled == frozenset({"cpu", "memory", "pids", "io", "cpuset"})
    assert (fs / "cgroup.subtree_control").read_text() == "+cpu +memory +pids +io +cpuset"
    assert (fs / "agent/cgroup.subtree_control").read_text() == "+cpu +memory +pids +io +cpuset"
    assert cg.controllers() == enabled


def test_setup_without_optional_controllers(fs: Path) -> None:
    (fs / "cgroup.controllers").write_text("cpu memory pids\n")
    cg, _, _ = backend(fs)
    assert cg.setup() == frozenset({"cpu", "memory", "pids"})
    populate(cg.create("web"))
    (fs / "agent/web/io.weight").unlink()
    cg.set_limits("web", Limits(io_weight=500))  # skipped, not an error
    assert not (fs / "agent/web/io.weight").exists()


def test_setup_refuses_missing_required_controller(fs: Path) -> None:
    (fs / "cgroup.controllers").write_text("cpu pids io\n")
    with pytest.raises(KernelError) as e:
        backend(fs)[0].setup()
    assert e.value.op == "enable controllers" and "memory" in (e.value.hint or "")


def test_setup_refuses_processes_in_subtree(fs: Path) -> None:
    (fs / "agent/cgroup.procs").write_text("42\n")
    with pytest.raises(KernelError) as e:
        backend(fs)[0].setup()
    assert e.value.errno == errno.EBUSY and e.value.target == str(fs / "agent")


def test_setup_moves_master_to_sibling(fs: Path) -> None:
    (fs / "agent-master").mkdir()
    (fs / "agent-master/cgroup.procs").write_text("")
    cg, _, _ = backend(fs, master="agent-master")
    cg.setup()
    assert (fs / "agent-master/cgroup.procs").read_text() == str(os.getpid())


def test_set_limits_writes_every_file(fs: Path) -> None:
    cg, _, _ = backend(fs)
    cg.setup()
    leaf = cg.create("web")
    assert leaf == fs / "agent/web"
    populate(leaf)
    cg.set_limits("web", Limits(cpu_max_millicores=250, cpu_weight=50, memory_min=1 << 20,
                                memory_high=48 << 20, memory_max=64 << 20, pids_max=32,
                                io_weight=300))
    got = {n: (leaf / n).read_text() for n in
           ("cpu.max", "cpu.weight", "memory.min", "memory.high", "memory.max", "pids.max",
            "io.weight")}
    assert got == {"cpu.max": "25000 100000", "cpu.weight": "50", "memory.min": "1048576",
                   "memory.high": "50331648", "memory.max": "67108864", "pids.max": "32",
                   "io.weight": "default 300"}
    cg.set_limits("web", Limits())
    assert (leaf / "cpu.max").read_text() == "max 100000"
    assert (leaf / "memory.max").read_text() == "max"
    assert (leaf / "pids.max").read_text() == "max"


def test_write_error_names_file_and_errno(fs: Path) -> None:
    cg, _, _ = backend(fs)
    cg.setup()
    populate(cg.create("web"), skip=("memory.high",))
    with pytest.raises(KernelError) as e:
        cg.set_limits("web", Limits(memory_high=1 << 20))
    assert e.value.op == "write"
    assert e.value.target == str(fs / "agent/web/memory.high")
    assert e.value.errno == errno.ENOENT
    assert e.value.hint and "subtree_control" in e.value.hint
    assert e.value.code == "E_KERNEL"


def test_write_permission_error(fs: Path) -> None:
    cg, _, _ = backend(fs)
    cg.setup()
    populate(cg.create("web"))
    (fs / "agent/web/pids.max").chmod(0o444)

    def refused() -> None:
        with pytest.raises(KernelError) as e:
            cg.set_limits("web", Limits(pids_max=3))
        assert e.value.errno == errno.EACCES

    if os.geteuid() != 0:
        refused()
        return
    # root ignores file modes: the write is made by a child that dropped to nobody
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            refused()
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_stats(fs: Path) -> None:
    cg, _, _ = backend(fs)
    populate(cg.create("web"), skip=("io.pressure",))
    st_ = cg.stats("web")
    assert st_.cpu_usage_usec == 1234
    assert st_.memory_current == 4096
    assert st_.pids_current == 2
    assert st_.memory_events["max"] == 2 and st_.memory_events["oom_kill"] == 1
    assert set(st_.pressure) == {"cpu", "memory"}
    assert st_.pressure["cpu"].some.avg10 == 1.5
    assert st_.pressure["cpu"].some.total_usec == 777
    assert st_.pressure["cpu"].full is not None and st_.pressure["cpu"].full.total_usec == 5
    (fs / "agent/web/memory.current").write_text("garbage\n")
    with pytest.raises(KernelError) as e:
        cg.stats("web")
    assert e.value.op == "parse"


def test_kill_with_cgroup_kill(fs: Path) -> None:
    cg, clock, killed = backend(fs)
    populate(cg.create("web"))
    (fs / "agent/web/cgroup.procs").write_text("")
    cg.kill("web")
    assert (fs / "agent/web/cgroup.kill").read_text() == "1"
    assert killed == []
    # processes that never leave: bounded wait, then an error naming the cgroup
    (fs / "agent/web/cgroup.procs").write_text("77\n")
    with pytest.raises(KernelError) as e:
        cg.kill("web", timeout=2.0)
    assert e.value.op == "kill" and e.value.errno == errno.ETIMEDOUT
    assert 2.0 <= clock.now < 2.2


def test_kill_fallback_freezes_and_signals_each_pid(fs: Path) -> None:
    cg, _, killed = backend(fs)
    populate(cg.create("web"), skip=("cgroup.kill",))
    (fs / "agent/web/cgroup.procs").write_text("101\n102\n")
    cg.kill("web")
    assert sorted(killed) == [(101, 9), (102, 9)]
    assert (fs / "agent/web/cgroup.freeze").read_text() == "0"  # thawed afterwards
    cg.kill("nonexistent")  # idempotent


def test_freeze_thaw_wait_for_events(fs: Path) -> None:
    cg, _, _ = backend(fs)
    populate(cg.create("web"))
    (fs / "agent/web/cgroup.events").write_text("populated 1\nfrozen 1\n")
    cg.freeze("web")
    assert (fs / "agent/web/cgroup.freeze").read_text() == "1"
    with pytest.raises(KernelError) as e:  # events still say frozen
        cg.thaw("web", timeout=1.0)
    assert e.value.op == "thaw"
    (fs / "agent/web/cgroup.events").write_text("populated 1\nfrozen 0\n")
    cg.thaw("web")
    assert (fs / "agent/web/cgroup.freeze").read_text() == "0"


def test_remove_list_and_idempotence(fs: Path) -> None:
    cg, _, _ = backend(fs)
    cg.create("a")
    cg.create("b.1")
    (fs / "agent/not a cell").mkdir()
    (fs / "agent/cgroup.stray").write_text("")
    assert cg.list_cells() == ["a", "b.1"]
    cg.remove("a")
    cg.remove("a")
    assert cg.list_cells() == ["b.1"]
    populate(fs / "agent/b.1/child")
    with pytest.raises(KernelError) as e:  # a fake dir with files: ENOTEMPTY
        cg.remove("b.1")
    assert e.value.op == "rmdir"


@pytest.mark.parametrize("bad", ["", "..", "a/b", "../x", "A", "-x", ".x", "a" * 64, "a..b"])
def test_cell_names_cannot_escape(fs: Path, bad: str) -> None:
    cg, _, _ = backend(fs)
    with pytest.raises(ConfigError):
        cg.create(bad)
    with pytest.raises(ConfigError):
        check_cell_name(bad)


def test_pid_to_cell(fs: Path, tmp_path: Path) -> None:
    cg, _, _ = backend(fs)
    proc = tmp_path / "proc"
    for pid, text in {
        10: "0::/agent/web\n",
        11: "0::/agent/web/sub/deeper\n",
        12: "0::/agent-master\n",
        13: "12:pids:/agent/web\n0::/\n",
        14: "0::/agent\n",
    }.items():
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text(text)
    assert cg.pid_to_cell(10, proc) == "web"
    assert cg.pid_to_cell(11, proc) == "web"
    assert cg.pid_to_cell(12, proc) is None
    assert cg.pid_to_cell(13, proc) is None
    assert cg.pid_to_cell(14, proc) is None
    assert cg.pid_to_cell(99, proc) is None
    # the real /proc: this process is not in a cell
    assert cg.pid_to_cell(os.getpid()) is None


def test_nested_root_prefix(tmp_path: Path) -> None:
    cg = CgroupV2(tmp_path / "system.slice" / "agent", mount=tmp_path)
    assert cg.prefix == "/system.slice/agent"
    assert cell_from_proc_cgroup("0::/system.slice/agent/x\n", cg.prefix) == "x"


def test_limits_validation_and_cpu_line() -> None:
    assert Limits(cpu_max_millicores=1500).cpu_max_line() == "150000 100000"
    assert Limits(cpu_max_millicores=1, cpu_period_us=10000).cpu_max_line() == "1000 10000"
    for kw in ({"cpu_weight": 0}, {"io_weight": 10001}, {"cpu_max_millicores": 0},
               {"memory_min": 10, "memory_max": 5}, {"memory_high": 10, "memory_max": 5},
               {"pids_max": -1}, {"cpu_period_us": 10}):
        with pytest.raises(ConfigError):
            Limits(**kw)
    names = [n for n, _ in Limits().files()]
    assert names.index("memory.high") < names.index("memory.max")


def test_parse_pressure_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_pressure("some avg10=x\n")
    with pytest.raises(ValueError):
        parse_pressure("full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    p = parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=9\n")
    assert p.full is None and p.some.total_usec == 9


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
                       st.integers(0, 2**63)))
def test_flat_keyed_round_trip(d: dict[str, int]) -> None:
    assert parse_flat_keyed("".join(f"{k} {v}\n" for k, v in d.items())) == d
