"""Cell operations against a recording fake context: delegation and the undo contract.

This is a unit test of what each op asks its adapters and how it undoes itself; the
adapters themselves are tested for real elsewhere (cgroup fake fs, net privileged/guest,
spawn privileged).  Paths are real directories under tmp_path.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.core import seccomp
from agent.core.cellctx import DataMount, Paths
from agent.core.cellops import (
    EnsureGateway,
    MakeCgroup,
    MountData,
    PrepareDirs,
    StartService,
    mount_from_wire,
    mount_to_wire,
)
from agent.core.cgroup import Limits
from agent.core.config import AgentConfig
from agent.core.datavol import ImageUse, StateUsage
from agent.core.errors import ConfigError, KernelError, NotFoundError
from agent.core.manifest import DataDir, load_manifest
from agent.core.plan import Executor, Operation, PlanError, op_from_wire, op_to_wire
from agent.core.planner import Allocation, plan_create, plan_destroy
from agent.core.sandbox import Mount, SpawnSpec
from agent.core.teardown import KillCell, ReleaseDirs
from agent.kernel.dirs import CellDirs
from agent.kernel.journal import Journal

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "rootfs-overlay/etc/agent/services"
DEMOS = ("demo-web", "demo-echo", "demo-client")


class Crash(BaseException):
    """agentd killed: not an Exception, so the executor does not roll back."""


@dataclass
class Fake:
    """cgroup + net + spawner in one recording object, with the kernel's main refusals."""

    root: Path
    fail: set[str] = field(default_factory=set)  # method names that raise
    crash: set[str] = field(default_factory=set)  # method names that "kill agentd" midway
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    leaves: dict[str, Limits | None] = field(default_factory=dict)
    procs: dict[str, set[int]] = field(default_factory=dict)
    netns: set[str] = field(default_factory=set)
    links: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    gateways: dict[int, str] = field(default_factory=dict)
    specs: list[SpawnSpec] = field(default_factory=list)
    next_pid: int = 1000

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise KernelError(name, str(args[0]), errno.EIO)

    def _after(self, name: str) -> None:
        if name in self.crash:
            raise Crash(name)

    def state(self) -> tuple[Any, ...]:
        return (dict(self.leaves), {k: set(v) for k, v in self.procs.items() if v},
                set(self.netns), dict(self.links), dict(self.gateways))

    # cgroup
    def create(self, cell: str) -> Path:
        self._call("create", cell)
        self.leaves.setdefault(cell, None)
        self._after("create")
        return self.leaf(cell)

    def set_limits(self, cell: str, limits: Limits) -> None:
        self._call("set_limits", cell, limits)
        if cell not in self.leaves:
            raise KernelError("write", str(self.leaf(cell)), errno.ENOENT)
        self.leaves[cell] = limits

    def kill(self, cell: str, timeout: float = 5.0) -> None:
        self._call("kill", cell)
        self.procs.pop(cell, None)

    def remove(self, cell: str, timeout: float = 5.0) -> None:
        self._call("remove", cell)
        if self.procs.get(cell):
            raise KernelError("rmdir", str(self.leaf(cell)), errno.EBUSY)
        self.leaves.pop(cell, None)

    def leaf(self, cell: str) -> Path:
        return self.root / "cgroup" / cell

    # net
    def create_netns(self, cell: str) -> Path:
        self._call("create_netns", cell)
        self.netns.add(cell)
        self._after("create_netns")
        return self.netns_path(cell)

    def destroy_netns(self, cell: str) -> None:
        self._call("destroy_netns", cell)
        self.netns.discard(cell)

    def netns_path(self, cell: str) -> Path:
        return self.root / "netns" / f"cell-{cell}"

    def ensure_gateway(self, vlan: int, gateway: str) -> bool:
        self._call("ensure_gateway", vlan, gateway)
        created = vlan not in self.gateways
        self.gateways[vlan] = gateway
        return created

    def remove_gateway(self, vlan: int) -> None:
        self._call("remove_gateway", vlan)
        self.gateways.pop(vlan, None)

    def create_link(self, cell: str, vlan: int, address: str, gateway: str) -> None:
        self._call("create_link", cell, vlan, address, gateway)
        if cell not in self.netns or cell in self.links:
            raise KernelError("netlink link add", cell, errno.EEXIST)
        self.links[cell] = (vlan, address, gateway)
        self._after("create_link")

    def destroy_link(self, cell: str) -> None:
        self._call("destroy_link", cell)
        self.links.pop(cell, None)

    # spawner
    def start(self, cell: str, spec: SpawnSpec) -> int:
        self._call("start", cell, spec.argv)
        if cell not in self.leaves or cell not in self.netns:
            raise KernelError("spawn", spec.argv[0], errno.ENOENT)
        self.next_pid += 1
        self.procs.setdefault(cell, set()).add(self.next_pid)
        self.specs.append(spec)
        self._after("start")
        return self.next_pid

    def stop(self, cell: str, pid: int | None) -> None:
        self._call("stop", cell, pid)
        if pid is None:
            self.procs.pop(cell, None)
        else:
            self.procs.get(cell, set()).discard(pid)


@dataclass
class FakeImages:
    """The data image adapter without loop devices: an image is a file, a mount is the
    mount point dir plus a record (agent.kernel.dataimage is tested for real in
    tests/privileged/test_dataimage_host.py and the box)."""

    mounted: dict[Path, DataMount] = field(default_factory=dict)
    avail: int = 1 << 40  # free bytes on the "state file system"

    def mount(self, req: DataMount) -> dict[str, Any]:
        made = False
        if not req.image.exists():
            if req.readonly:
                raise NotFoundError("E_DATA_SOURCE", f"no data image {req.image}")
            req.image.parent.mkdir(parents=True, exist_ok=True)
            req.image.write_bytes(b"ext4")
            made = True
        req.mount.mkdir(mode=0o700, exist_ok=True)
        self.mounted[req.mount] = req
        return {"made": made, "grown": False, "device": "/dev/loop9", "shifted_from": None}

    def unmount(self, mount: Path) -> None:
        self.mounted.pop(mount, None)
        if mount.exists():
            mount.rmdir()

    def usage(self, images_dir: Path, state_dir: Path) -> StateUsage:
        images = {p.stem: ImageUse(16 << 20, p.stat().st_size)
                  for p in images_dir.glob("*.img")} if images_dir.is_dir() else {}
        return StateUsage(self.avail, images)


@dataclass
class Ctx:
    cgroup: Fake
    net: Fake
    spawner: Fake
    paths: Paths
    dirs: CellDirs = field(default_factory=lambda: CellDirs(FakeImages()))  # type: ignore[arg-type]
    firewall: None = None  # no nftables in these tests (ApplyCellFirewall refuses)

    @property
    def images(self) -> FakeImages:
        images = self.dirs.images
        assert isinstance(images, FakeImages)
        return images


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def config(tmp_path: Path) -> AgentConfig:
    cfg = AgentConfig(state_dir=tmp_path / "state", run_dir=tmp_path / "run")
    (cfg.run_dir / "cells").mkdir(parents=True)  # the daemon's own roots, made at start-up
    (cfg.state_dir / "data").mkdir(parents=True)
    return cfg


@pytest.fixture
def ctx(tmp_path: Path, config: AgentConfig) -> Ctx:
    fake = Fake(tmp_path / "fake")
    return Ctx(fake, fake, fake, Paths(config.state_dir, config.run_dir))


ROOT_USER = os.getuid() == 0


def alloc_for(name: str) -> Allocation:
    base = 100_000 if ROOT_USER else None  # without root: no userns, and ids we can chown to
    if name == "demo-echo":
        return Allocation(uid_base=base)
    return Allocation(100, "10.77.0.2/24", "10.77.0.1", base)


def create_plan(name: str, config: AgentConfig, data: bool = False) -> Any:
    m = load_manifest(str(SERVICES / f"{name}.toml"))
    if data:
        m = replace(m, data=DataDir("/var/lib/web", name, 8 << 20))
    if not ROOT_USER:
        m = replace(m, service=replace(m.service, uid=os.getuid(), gid=os.getgid()))
    a = alloc_for(name)
    cfg = replace(config, userns=ROOT_USER)
    return m, a, cfg, plan_create(m, a, cfg)


# -- whole plans through the real executor ----------------------------------------------------


@pytest.mark.parametrize("name", DEMOS)
def test_create_then_destroy_leaves_nothing(tmp_path: Path, ctx: Ctx, config: AgentConfig,
                                            name: str) -> None:
    fake = ctx.cgroup
    before, fs_before = fake.state(), files(tmp_path)
    m, a, cfg, plan = create_plan(name, config)
    with Journal(tmp_path / "journal") as j:
        ex = Executor(j, ctx)
        ex.run(plan)
        assert m.name in fake.leaves and m.name in fake.netns and fake.procs[m.name]
        assert (m.name in fake.links) == (m.network is not None)
        assert (ctx.paths.cell_run_dir(m.name)).is_dir()
        ex.run(plan_destroy(m, cfg, a, last_on_vlan=True))
        ex.run(plan_destroy(m, cfg, a, last_on_vlan=True))  # idempotent
    assert fake.state() == before
    assert files(tmp_path) - fs_before == {"journal"}


@pytest.mark.parametrize("fail", ["set_limits", "create_netns", "ensure_gateway",
                                  "create_link", "start"])
def test_a_failing_step_undoes_the_steps_before_it(tmp_path: Path, ctx: Ctx,
                                                   config: AgentConfig, fail: str) -> None:
    fake = ctx.cgroup
    before = fake.state()
    m, _, _, plan = create_plan("demo-web", config, data=True)
    fake.fail.add(fail)
    with Journal(tmp_path / "journal") as j, pytest.raises(PlanError) as ei:
        Executor(j, ctx).run(plan)
    assert isinstance(ei.value.__cause__, KernelError) and ei.value.undo_errors == ()
    assert fake.state() == before
    assert not ctx.paths.cell_run_dir(m.name).exists()
    assert ctx.images.mounted == {}
    assert ctx.paths.data_image(m.name).exists()  # data images are never deleted


@pytest.mark.parametrize("crash", ["create", "create_netns", "create_link", "start"])
def test_a_crash_mid_apply_is_repaired_after_restart(tmp_path: Path, ctx: Ctx,
                                                     config: AgentConfig, crash: str) -> None:
    fake = ctx.cgroup
    before = fake.state()
    m, _, _, plan = create_plan("demo-web", config)
    fake.crash.add(crash)
    j = Journal(tmp_path / "journal")
    with pytest.raises(Crash):
        Executor(j, ctx).run(plan)
    j.abandon()
    assert fake.state() != before
    fake.crash.clear()
    with Journal(tmp_path / "journal") as j2:
        ex = Executor(j2, ctx)
        (report,) = ex.repair(ex.recover())
    assert report.errors == ()
    # the gateway may stay (created by a step whose undo data was lost); the rest is gone
    state = fake.state()
    assert state[:4] == before[:4]
    assert not ctx.paths.cell_run_dir(m.name).exists()


# -- each op on its own ------------------------------------------------------------------------


def all_ops(config: AgentConfig) -> list[Operation]:
    _, a, cfg, plan = create_plan("demo-web", config, data=True)
    return list(plan.ops) + list(plan_destroy("demo-web", cfg, a, last_on_vlan=True).ops)


def test_every_op_round_trips_through_the_journal_encoding(config: AgentConfig) -> None:
    ops = all_ops(config)
    assert len({op.kind for op in ops}) == len(ops) == 14
    for op in ops:
        back = op_from_wire(cbor2.loads(cbor2.dumps(op_to_wire(op))))
        assert back == op and type(back) is type(op)
        assert back.describe() == op.describe() and "\n" not in op.describe()


def test_undo_with_empty_data_on_nothing_is_safe(tmp_path: Path, ctx: Ctx,
                                                 config: AgentConfig) -> None:
    fake = ctx.cgroup
    before, fs_before = fake.state(), files(tmp_path)
    for op in all_ops(config):
        op.undo(ctx, {})
        op.undo(ctx, {})  # idempotent
    assert fake.state() == before and files(tmp_path) == fs_before


def test_each_create_op_apply_then_undo_restores(tmp_path: Path, ctx: Ctx,
                                                 config: AgentConfig) -> None:
    fake = ctx.cgroup
    _, _, _, plan = create_plan("demo-web", config, data=True)
    for i, op in enumerate(plan.ops):
        for prev in plan.ops[:i]:  # what the op stands on
            prev.apply(ctx)
        before, fs_before = fake.state(), files(tmp_path)
        undo = op.apply(ctx)
        cbor2.dumps(dict(undo))  # undo data is journaled
        assert fake.state() != before or files(tmp_path) != fs_before, op.describe()
        op.undo(ctx, undo)
        kept = {str(ctx.paths.data_image("demo-web").relative_to(tmp_path))}  # never deleted
        assert fake.state() == before and files(tmp_path) - kept == fs_before - kept, \
            op.describe()
        for prev in reversed(plan.ops[:i]):
            prev.undo(ctx, {})


def test_empty_undo_data_keeps_what_may_be_shared_or_precious(tmp_path: Path, ctx: Ctx,
                                                              config: AgentConfig) -> None:
    fake = ctx.cgroup
    gw = EnsureGateway(100, "10.77.0.1/24")
    gw.apply(ctx)
    gw.undo(ctx, {})
    assert fake.gateways == {100: "10.77.0.1/24"}  # maybe another cell's: reclaim decides
    assert gw.apply(ctx) == {"created": False}
    gw.undo(ctx, {"created": False})
    assert fake.gateways == {100: "10.77.0.1/24"}
    d = PrepareDirs("web", str(ctx.paths.cell_run_dir("web")))
    d.apply(ctx)
    data = MountData("web", "web", str(ctx.paths.data_image("web")),
                     str(ctx.paths.data_mount("web")), 8 << 20, os.getuid(), os.getgid(),
                     0, 1 << 16)
    assert data.apply(ctx)["made"] is True
    data.undo(ctx, {})
    data.undo(ctx, {"made": True})  # made or not, undo only unmounts: the data stays
    assert ctx.paths.data_image("web").read_bytes() == b"ext4"
    assert ctx.images.mounted == {} and not ctx.paths.data_mount("web").exists()
    d.undo(ctx, {})
    assert not ctx.paths.cell_run_dir("web").exists()


def test_prepare_dirs_writes_the_hosts_file(ctx: Ctx) -> None:
    run = ctx.paths.cell_run_dir("web")
    text = "127.0.0.1\tlocalhost\n::1\tlocalhost\n10.77.0.3\tweb\n10.77.0.2\tdb\n"
    d = PrepareDirs("web", str(run), hosts=text)
    assert "hosts (web db)" in d.describe()
    d.apply(ctx)
    assert (run / "hosts").read_text() == text
    assert (run / "hosts").stat().st_mode & 0o777 == 0o644
    assert run.stat().st_mode & 0o777 == 0o711  # the mapped cell root may reach the file
    d.undo(ctx, {})
    assert not run.exists()
    bare = PrepareDirs("web", str(run))
    bare.apply(ctx)
    assert not (run / "hosts").exists() and run.stat().st_mode & 0o777 == 0o700
    bare.undo(ctx, {})


def test_hosts_bind_source_is_checked_and_optional_survives_the_wire(ctx: Ctx) -> None:
    hosts = Mount("bind", "/etc/hosts", source="/elsewhere/hosts", flags=frozenset({"ro"}),
                  optional=True)
    assert mount_from_wire(mount_to_wire(hosts)) == hosts
    assert len(mount_to_wire(Mount("proc", "/proc"))) == 6  # old journals decode unchanged
    evil = StartService("web", ("/bin/true",), "/img", mounts=(mount_to_wire(hosts),))
    with pytest.raises(ConfigError):
        evil.spawn_spec(ctx)


def test_destroy_steps_do_not_undo(tmp_path: Path, ctx: Ctx, config: AgentConfig) -> None:
    fake = ctx.cgroup
    _, _, _, plan = create_plan("demo-web", config)
    for op in plan.ops:
        op.apply(ctx)
    before = fake.state()
    calls = len(fake.calls)
    for op in plan_destroy("demo-web", config).ops:
        op.undo(ctx, {})
    assert fake.state() == before and len(fake.calls) == calls


def test_make_cgroup_leaves_nothing_when_limits_fail(ctx: Ctx) -> None:
    fake = ctx.cgroup
    fake.fail.add("set_limits")
    with pytest.raises(KernelError):
        MakeCgroup("web", Limits(pids_max=4)).apply(ctx)
    assert fake.leaves == {}
    assert [c[0] for c in fake.calls] == ["create", "set_limits", "remove"]


def test_kill_cell_kills_through_the_spawner_and_the_cgroup(ctx: Ctx) -> None:
    fake = ctx.cgroup
    KillCell("web").apply(ctx)
    assert fake.calls == [("stop", "web", None), ("kill", "web")]


def test_paths_are_rechecked_against_the_context(tmp_path: Path, ctx: Ctx) -> None:
    evil = PrepareDirs("web", str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="not"):
        evil.apply(ctx)
    with pytest.raises(ConfigError):
        ReleaseDirs("web", "/").apply(ctx)
    bind = StartService("web", ("/bin/sh",), "/img", mounts=(
        mount_to_wire(Mount("bind", "/data", source="/etc", flags=frozenset({"nosuid"}))),))
    with pytest.raises(ConfigError):
        bind.apply(ctx)
    assert ctx.cgroup.calls == [] and not (tmp_path / "elsewhere").exists()


def test_start_service_builds_the_spawn_spec(ctx: Ctx, config: AgentConfig) -> None:
    fake = ctx.cgroup
    _, a, _, plan = create_plan("demo-web", config, data=True)
    for op in plan.ops:
        op.apply(ctx)
    (spec,) = fake.specs
    start = plan.ops[-1]
    assert isinstance(start, StartService)
    assert spec.netns_path == str(fake.netns_path("demo-web"))
    assert spec.cgroup_path == str(fake.leaf("demo-web"))
    assert spec.hostname == "demo-web" and spec.no_new_privs
    assert (spec.uid, spec.gid) == ((1000, 1000) if ROOT_USER else (os.getuid(), os.getgid()))
    if a.uid_base is not None:
        assert spec.userns is not None and spec.userns.base == a.uid_base
    assert spec.seccomp == seccomp.pack(seccomp.compile_filter(
        seccomp.FilterSpec.for_cell(())))
    (req,) = ctx.images.mounted.values()
    owner = (101_000, 101_000) if ROOT_USER else (os.getuid(), os.getgid())
    assert (req.uid, req.gid, req.size, req.readonly) == (*owner, 8 << 20, False)
    assert req.image == ctx.paths.data_image("demo-web")
    by_target = {m.target: m for m in spec.mounts}
    assert by_target["/var/lib/web"].source == str(ctx.paths.data_mount("demo-web"))
    assert by_target["/var/lib/web"].flags == {"nosuid", "nodev", "noexec"}
    undo = {"pid": max(fake.procs["demo-web"])}
    start.undo(ctx, undo)
    assert fake.calls[-2:] == [("stop", "demo-web", undo["pid"]), ("kill", "demo-web")]
