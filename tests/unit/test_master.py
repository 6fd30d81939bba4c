"""agent.master orchestration against recording fakes (cgroup, net and spawner in one).

A unit test of the manager's logic: request checks, lifecycle effects, journaling,
repair and adoption.  The adapters are tested for real elsewhere (guest tests)."""

from __future__ import annotations

import asyncio
import errno
import shutil
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.core.budget import Amount
from agent.core.cell import Exit, State
from agent.core.cellrecord import pin_from_wire
from agent.core.cgroup import CellStats, Limits
from agent.core.config import AgentConfig
from agent.core.errors import AgentError, KernelError
from agent.core.logbuf import LogBuffer
from agent.core.policy import load_policy
from agent.core.sandbox import SpawnSpec
from agent.daemon.bus import EventBus
from agent.daemon.cellapi import inspect_cell, ps_row
from agent.daemon.manager import CellManager
from agent.daemon.spawner import ExitCallback

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "rootfs-overlay/etc/agent"


class Crash(BaseException):
    """agentd killed -9 in the middle of a step."""


@dataclass
class Kernel:
    """What survives an agentd restart: cgroups, netns, links, gateways, processes."""

    fail: set[str] = field(default_factory=set)
    crash: set[str] = field(default_factory=set)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    leaves: dict[str, Limits | None] = field(default_factory=dict)
    procs: dict[str, set[int]] = field(default_factory=dict)
    netns: set[str] = field(default_factory=set)
    links: dict[str, int] = field(default_factory=dict)
    gateways: dict[int, str] = field(default_factory=dict)
    next_pid: int = 1000

    def cells(self) -> tuple[Any, ...]:
        return (dict(self.leaves), {k: v for k, v in self.procs.items() if v},
                set(self.netns), dict(self.links))


class Fake:
    """cgroup + net + spawner adapters of one agentd over a shared :class:`Kernel`."""

    def __init__(self, k: Kernel, root: Path, on_exit: ExitCallback) -> None:
        self.k = k
        self.root = root
        self.on_exit = on_exit
        self.loop = asyncio.get_running_loop()
        self.signals: list[tuple[str, int]] = []
        self.adopted: list[tuple[str, int]] = []
        self.specs: list[SpawnSpec] = []
        self.buffers: dict[str, LogBuffer] = {}

    def _call(self, name: str, *args: Any) -> None:
        self.k.calls.append((name, *args))
        if name in self.k.fail:
            raise KernelError(name, str(args[0]), errno.EIO)
        if name in self.k.crash:
            raise Crash(name)

    # cgroup
    def create(self, cell: str) -> Path:
        self._call("create", cell)
        self.k.leaves.setdefault(cell, None)
        return self.leaf(cell)

    def set_limits(self, cell: str, limits: Limits) -> None:
        self._call("set_limits", cell)
        self.k.leaves[cell] = limits

    def kill(self, cell: str, timeout: float = 5.0) -> None:
        self._call("kill", cell)
        for pid in self.k.procs.pop(cell, set()):
            self.loop.call_soon_threadsafe(self.on_exit, cell, pid, Exit(signal=9))

    def remove(self, cell: str, timeout: float = 5.0) -> None:
        self._call("remove", cell)
        if self.k.procs.get(cell):
            raise KernelError("rmdir", cell, errno.EBUSY)
        self.k.leaves.pop(cell, None)

    def leaf(self, cell: str) -> Path:
        return self.root / "cgroup" / cell

    def procs(self, cell: str) -> list[int]:
        if cell not in self.k.leaves:
            raise KernelError("read", cell, errno.ENOENT)
        return sorted(self.k.procs.get(cell, ()))

    def stats(self, cell: str) -> CellStats:
        if cell not in self.k.leaves:
            raise KernelError("read", cell, errno.ENOENT)
        return CellStats(cpu_usage_usec=5000, memory_current=1 << 20, memory_events={},
                         pids_current=len(self.k.procs.get(cell, ())), pressure={})

    # net
    def create_netns(self, cell: str) -> Path:
        self._call("create_netns", cell)
        self.k.netns.add(cell)
        return self.netns_path(cell)

    def destroy_netns(self, cell: str) -> None:
        self._call("destroy_netns", cell)
        self.k.netns.discard(cell)

    def netns_path(self, cell: str) -> Path:
        return self.root / "netns" / cell

    def ensure_gateway(self, vlan: int, gateway: str) -> bool:
        self._call("ensure_gateway", vlan)
        created = vlan not in self.k.gateways
        self.k.gateways[vlan] = gateway
        return created

    def remove_gateway(self, vlan: int) -> None:
        self._call("remove_gateway", vlan)
        self.k.gateways.pop(vlan, None)

    def gateway_vlans(self) -> set[int]:
        return set(self.k.gateways)

    def create_link(self, cell: str, vlan: int, address: str, gateway: str) -> None:
        self._call("create_link", cell)
        self.k.links[cell] = vlan

    def destroy_link(self, cell: str) -> None:
        self._call("destroy_link", cell)
        self.k.links.pop(cell, None)

    # spawner
    def start(self, cell: str, spec: SpawnSpec) -> int:
        self._call("start", cell)
        self.specs.append(spec)
        pid = self.k.next_pid
        self.k.next_pid += 1
        self.k.procs.setdefault(cell, set()).add(pid)
        self.buffers.setdefault(cell, LogBuffer(1024)).feed("stdout", b"started\n")
        return pid

    def stop(self, cell: str, pid: int | None) -> None:
        self._call("stop", cell)
        self.k.procs.pop(cell, None)

    def adopt(self, cell: str, pid: int) -> None:
        self.adopted.append((cell, pid))

    def signal(self, cell: str, sig: int) -> bool:
        self.signals.append((cell, sig))
        return bool(self.k.procs.get(cell))

    def logs(self, cell: str) -> LogBuffer | None:
        return self.buffers.get(cell)

    def close(self) -> None:
        pass

    def exit(self, cell: str, ex: Exit) -> None:
        """The service ends by itself."""
        for pid in self.k.procs.pop(cell, set()):
            self.on_exit(cell, pid, ex)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    services = tmp_path / "services"
    shutil.copytree(OVERLAY / "services", services)
    image = tmp_path / "fs/usr/share/agent/images/demo"
    for d in ("bin", "www", "tmp"):
        (image / d).mkdir(parents=True)
    (image / "bin/busybox").write_text("")
    (image / "bin/busybox").chmod(0o755)
    cfg = AgentConfig(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                      services_dir=services, policy_path=OVERLAY / "policy.toml")
    return {"cfg": cfg, "kernel": Kernel(), "tmp": tmp_path, "bus": EventBus()}


BIG = Amount(4000, 1 << 30, 4096)


async def manager(env: dict[str, Any], *, capacity: Amount = BIG,
                  start: bool = True) -> tuple[CellManager, Fake]:
    made: list[Fake] = []

    def make(on_exit: ExitCallback) -> Fake:
        made.append(Fake(env["kernel"], env["tmp"], on_exit))
        return made[0]

    fake_box: list[Fake] = []

    class Proxy:  # cgroup/net adapters are the same Fake as the spawner
        def __getattr__(self, name: str) -> Any:
            return getattr(fake_box[0], name)

    mgr = CellManager(env["cfg"], env["bus"], load_policy(str(OVERLAY / "policy.toml")),
                      cgroup=Proxy(), net=Proxy(),
                      make_spawner=make, capacity=capacity, fs_root=str(env["tmp"] / "fs"),
                      sigterm_caught=lambda pid: False)
    fake_box.append(made[0])
    mgr.open_journal(asyncio.get_running_loop())
    if start:
        await mgr.start()
    return mgr, made[0]


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def kinds(bus: EventBus, cell: str) -> list[str]:
    return [e.kind for e in bus.recent(None, cell=cell, channel="lifecycle")]


def arun(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro())


def test_run_then_stop_frees_everything(env: dict[str, Any]) -> None:
    async def main() -> None:
        mgr, fake = await manager(env)
        free = mgr.budget.free
        out = await mgr.run("demo-web", 0, 0)
        assert out["state"] == "running" and out["vlan"] == 100 and out["pid"] == 1000
        k = env["kernel"]
        assert k.leaves["demo-web"] is not None and k.links == {"demo-web": 100}
        spec = fake.specs[0]
        assert spec.userns is not None and spec.uid == 1000 and spec.cgroup_path
        assert mgr.budget.free.memory == free.memory - (8 << 20)
        row = ps_row(mgr, mgr.cells["demo-web"])
        assert row["state"] == "running" and row["address"] == "10.77.0.2"
        assert row["pids"] == 1 and row["memory_max"] == 32 << 20
        info = inspect_cell(mgr, mgr.cells["demo-web"])
        assert info["plan"][0].startswith("plan create-demo-web") and info["seccomp"]
        with pytest.raises(AgentError) as exc:
            await mgr.run("demo-web", 0, 0)
        assert exc.value.code == "E_EXISTS"
        done = await mgr.stop("demo-web", 0, 0)
        assert done["state"] == "destroyed"
        assert fake.signals == [("demo-web", 15)]
        assert k.cells() == ({}, {}, set(), {})
        assert mgr.budget.free == free and mgr.pool.leases() == [] and mgr.cells == {}
        assert kinds(env["bus"], "demo-web") == [
            "admitted", "creating", "running", "stopping", "destroying", "destroyed"]
        assert all(env["bus"].is_persistent(e) for e in env["bus"].recent(None,
                                                                           channel="lifecycle"))

    arun(main)


def test_oneshot_is_destroyed_when_it_exits(env: dict[str, Any]) -> None:
    async def main() -> None:
        mgr, fake = await manager(env)
        await mgr.run("demo-echo", 0, 0)
        fake.exit("demo-echo", Exit(code=0))
        await until(lambda: "demo-echo" not in mgr.cells)
        assert env["kernel"].cells() == ({}, {}, set(), {})
        assert "destroyed" in kinds(env["bus"], "demo-echo")

    arun(main)


def test_restart_with_backoff(env: dict[str, Any]) -> None:
    (env["cfg"].services_dir / "flaky.toml").write_text(
        'name = "flaky"\n[service]\ncommand = "/bin/busybox"\n[image]\n'
        'root = "/usr/share/agent/images/demo"\n[lifecycle]\nrestart = "on-failure"\n'
        'backoff = { initial = "50ms", max = "1s" }\n')

    async def main() -> None:
        mgr, fake = await manager(env)
        await mgr.run("flaky", 0, 0)
        fake.exit("flaky", Exit(code=3))
        await until(lambda: mgr.cells["flaky"].state is State.BACKOFF)
        assert mgr.cells["flaky"].cell.restarts == 1
        await until(lambda: mgr.cells["flaky"].state is State.RUNNING
                    and mgr.cells["flaky"].pid == 1001)
        assert [c for c in env["kernel"].calls if c[0] == "start"] == [("start", "flaky")] * 2
        fake.exit("flaky", Exit(code=0))  # success: on-failure does not restart
        await until(lambda: "flaky" not in mgr.cells)
        assert env["kernel"].cells() == ({}, {}, set(), {})

    arun(main)


def test_refusals_carry_codes_and_leave_nothing(env: dict[str, Any]) -> None:
    async def main() -> None:
        mgr, _ = await manager(env, capacity=Amount(4000, 100 << 20, 4096))
        cases = [("nope", 0, "E_NOT_FOUND"), ("demo-web", 4242, "E_POLICY_ROLE"),
                 ("../x", 0, "E_CELL_NAME"), ("demo-web", 0, "E_ADMISSION_MEMORY")]
        for name, uid, code in cases:
            with pytest.raises(AgentError) as exc:
                await mgr.run(name, uid, uid)
            assert exc.value.code == code, exc.value
        assert env["kernel"].calls == [] and mgr.cells == {} and mgr.pool.leases() == []
        assert "refused" in kinds(env["bus"], "demo-web")
        dry = await mgr.run("demo-echo", 0, 0, dry_run=True)
        assert len(dry["plan"]) == 5 and env["kernel"].calls == []

    arun(main)


def test_failed_creation_is_undone_and_released(env: dict[str, Any]) -> None:
    async def main() -> None:
        mgr, _ = await manager(env)
        env["kernel"].fail.add("create_link")
        with pytest.raises(AgentError) as exc:
            await mgr.run("demo-web", 0, 0)
        assert exc.value.code == "E_PLAN" and "create_link" in exc.value.message
        assert env["kernel"].cells() == ({}, {}, set(), {})
        assert mgr.cells == {} and mgr.pool.leases() == [] and mgr.budget.cells == ()
        env["kernel"].fail.clear()
        assert (await mgr.run("demo-web", 0, 0))["state"] == "running"

    arun(main)


def test_crash_mid_creation_is_repaired_at_restart(env: dict[str, Any]) -> None:
    async def main() -> None:
        # The cell's driver dies with the simulated kill; its task is collected later, at
        # any time.  Logging it then formats a traceback, which calls ast.parse in Python
        # 3.11: inside another ast.parse (test_layers) that is a SystemError.
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, c: None if isinstance(c.get("exception"), Crash)
            else loop.default_exception_handler(c))
        mgr, _ = await manager(env)
        env["kernel"].crash.add("create_link")
        task = asyncio.get_running_loop().create_task(mgr.run("demo-web", 0, 0))
        await until(lambda: ("create_link", "demo-web") in env["kernel"].calls)
        await asyncio.sleep(0.05)
        task.cancel()
        assert env["kernel"].leaves  # half made: cgroup and netns exist
        assert mgr.journal is not None
        mgr.journal.journal.abandon()  # killed: no clean close
        env["kernel"].crash.clear()
        mgr2, _ = await manager(env)
        await until(lambda: not mgr2.cells)
        assert env["kernel"].cells() == ({}, {}, set(), {})
        assert mgr2.pool.leases() == [] and mgr2.budget.cells == ()
        assert env["bus"].recent(None, kind="repaired")

    arun(main)


def test_restart_adopts_running_and_destroys_dead_cells(env: dict[str, Any]) -> None:
    async def main() -> None:
        mgr, _ = await manager(env)
        await mgr.run("demo-web", 0, 0)
        await mgr.run("demo-client", 0, 0)
        assert mgr.journal is not None
        mgr.journal.journal.abandon()
        env["kernel"].procs.pop("demo-client")  # died while agentd was down
        mgr2, fake2 = await manager(env)
        await until(lambda: "demo-client" not in mgr2.cells)
        web = mgr2.cells["demo-web"]
        assert web.state is State.RUNNING and web.pid == 1000
        assert fake2.adopted == [("demo-web", 1000)]
        assert "adopted" in kinds(env["bus"], "demo-web")
        assert [x.cell for x in mgr2.pool.leases()] == ["demo-web"]
        assert "demo-client" not in env["kernel"].leaves
        await mgr2.stop("demo-web", 0, 0)
        assert env["kernel"].cells() == ({}, {}, set(), {})

    arun(main)


def test_gateway_no_cell_holds_is_removed_at_start(env: dict[str, Any]) -> None:
    """A create plan undone after kill -9 may leave its VLAN's gateway (its step was in
    flight: no undo data); at start the manager knows every cell and removes it."""
    async def main() -> None:
        mgr, _ = await manager(env)
        await mgr.run("demo-web", 0, 0)
        assert set(env["kernel"].gateways) == {100}
        assert mgr.journal is not None
        mgr.journal.journal.abandon()
        env["kernel"].gateways[200] = "10.77.100.1/24"  # left by an undone plan
        await manager(env)
        assert set(env["kernel"].gateways) == {100}  # demo-web still holds VLAN 100
        assert [e.attrs["vlan"] for e in env["bus"].recent(None, kind="gateway-collected")
                ] == [200]

    arun(main)


def test_a_kept_pin_survives_kill_9_and_compaction(env: dict[str, Any]) -> None:
    """keep_pin journals the pin with the cell: a restarted manager (after kill -9, and
    after a compaction that rewrote the journal from the snapshot) has it again; a
    malformed journaled pin is dropped, not fatal."""
    async def main() -> None:
        mgr, _ = await manager(env)
        await mgr.run("demo-web", 0, 0)
        pin = {"cpu": 120, "memory_high": 14 << 20, "memory_max": 16 << 20}
        mgr.keep_pin("demo-web", pin)
        assert mgr.journal is not None
        mgr.journal.journal.abandon()
        mgr2, _ = await manager(env)
        assert mgr2.cells["demo-web"].pin == pin
        assert mgr2.journal is not None
        mgr2.journal.compact()
        mgr2.journal.journal.abandon()
        mgr3, _ = await manager(env)
        assert mgr3.cells["demo-web"].pin == pin
        mgr3.keep_pin("demo-web", None)
        unpinned = mgr3.cells["demo-web"]
        assert unpinned.pin is None
        await mgr3.stop("demo-web", 0, 0)

    arun(main)
    assert pin_from_wire({"cpu": 1, "memory_high": 2}) is None
    assert pin_from_wire({"cpu": True, "memory_high": 2, "memory_max": 3}) is None
    assert pin_from_wire({"cpu": 1, "memory_high": 2, "memory_max": -3}) is None
    assert pin_from_wire("x") is None


def test_a_lease_no_cell_holds_does_not_refuse_the_name_for_good(env: dict[str, Any]) -> None:
    """An orphan lease (seen once in the SIGKILL soak under load) is freed by the next run
    of its name, journaled and said; the control: a cell that exists is still E_EXISTS."""
    async def main() -> None:
        mgr, _ = await manager(env)
        mgr.pool.allocate("demo-web", 100)  # the orphan
        await mgr.run("demo-web", 0, 0)
        assert mgr.cells["demo-web"].state is State.RUNNING
        assert [x.cell for x in mgr.pool.leases()] == ["demo-web"]
        dropped = env["bus"].recent(None, kind="lease-dropped")
        assert [(e.cell, e.severity, e.attrs["why"]) for e in dropped] == [
            ("demo-web", "alert", "no cell held it")]
        with pytest.raises(AgentError) as info:
            await mgr.run("demo-web", 0, 0)
        assert info.value.code == "E_EXISTS"
        assert len(env["bus"].recent(None, kind="lease-dropped")) == 1
        await mgr.stop("demo-web", 0, 0)
        assert mgr.pool.leases() == []

    arun(main)
