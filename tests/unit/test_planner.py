"""The planner on the shipped example manifests: order, flags, limit numbers, explain()."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import seccomp
from agent.core.addrpool import AddrPool, PoolConfig
from agent.core.cellops import (
    EnsureGateway,
    MakeCgroup,
    MakeLink,
    MakeNetns,
    MountData,
    PrepareDirs,
    StartService,
    mount_from_wire,
)
from agent.core.config import AgentConfig
from agent.core.errors import ConfigError
from agent.core.grants import PRIVILEGED_OPS
from agent.core.manifest import DataDir, Manifest, Resources, Tmpfs, load_manifest
from agent.core.planner import (
    RLIMITS,
    Allocation,
    cgroup_limits,
    cpu_weight,
    hosts_file,
    plan_create,
    plan_destroy,
    plan_restart,
)
from agent.core.teardown import (
    KillCell,
    ReleaseDirs,
    RemoveCgroup,
    RemoveGateway,
    RemoveLink,
    RemoveNetns,
    UnmountData,
)

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "rootfs-overlay/etc/agent/services"
CFG = AgentConfig(state_dir=Path("/var/lib/agent"), run_dir=Path("/run/agent"))
NET = Allocation(100, "10.77.0.2/24", "10.77.0.1", 100_000)
HOSTS_WEB = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n10.77.0.2\tdemo-web\n"


def demo(name: str) -> Manifest:
    return load_manifest(str(SERVICES / f"{name}.toml"))


def test_demo_web_plan_order_and_numbers() -> None:
    plan = plan_create(demo("demo-web"), NET, CFG)
    assert [type(op) for op in plan.ops] == [PrepareDirs, MakeCgroup, MakeNetns, EnsureGateway,
                                             MakeLink, StartService]
    assert (plan.target, plan.purpose) == ("demo-web", "create")
    dirs, cg, ns, gw, link, start = plan.ops
    assert dirs == PrepareDirs("demo-web", "/run/agent/cells/demo-web", hosts=HOSTS_WEB)
    assert cg.to_wire()["limits"] == {
        "cpu_max_millicores": 500, "cpu_weight": 10, "memory_min": 8 << 20,
        "memory_high": 32 << 20, "memory_max": 32 << 20, "pids_max": 32, "io_weight": 100,
        "cpu_period_us": 100_000}
    assert isinstance(cg, MakeCgroup)
    assert dict(cg.limits.files()) == {
        "cpu.max": "50000 100000", "cpu.weight": "10", "memory.min": "8388608",
        "memory.high": "33554432", "memory.max": "33554432", "pids.max": "32",
        "io.weight": "default 100"}
    assert ns == MakeNetns("demo-web")
    assert gw == EnsureGateway(100, "10.77.0.1/24")
    assert link == MakeLink("demo-web", 100, "10.77.0.2/24", "10.77.0.1")
    assert isinstance(start, StartService)
    assert start.argv == ("/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www")
    assert (start.rootfs, start.cwd, start.uid, start.gid) == (
        "/usr/share/agent/images/demo", "/www", 1000, 1000)
    assert (start.userns_base, start.userns_count) == (100_000, 65536)
    mounts = [mount_from_wire(m) for m in start.mounts]
    assert [(m.kind, m.target) for m in mounts] == [("proc", "/proc"), ("dev", "/dev"),
                                                    ("tmpfs", "/tmp"), ("bind", "/etc/hosts")]
    hosts = mounts[3]
    assert hosts.source == "/run/agent/cells/demo-web/hosts" and hosts.optional
    assert hosts.flags == {"ro", "nosuid", "nodev", "noexec"}
    assert mounts[2].size == 4 << 20
    assert mounts[2].flags == {"nosuid", "nodev", "noexec"}
    assert start.caps_keep == () and start.rlimits == RLIMITS
    assert ("nofile", 1024, 4096) in RLIMITS and ("core", 0, 0) in RLIMITS


def test_demo_echo_has_no_link_and_runs_as_mapped_root() -> None:
    plan = plan_create(demo("demo-echo"), Allocation(uid_base=200_000), CFG)
    assert [op.kind for op in plan.ops] == ["prepare-dirs", "make-cgroup", "make-netns",
                                           "start-service"]
    start = plan.ops[-1]
    assert isinstance(start, StartService)
    assert start.env == (("LANG", "C"),) and start.userns_base == 200_000
    cg = plan.ops[1]
    assert isinstance(cg, MakeCgroup)
    assert cg.limits.cpu_max_line() == "25000 100000" and cg.limits.cpu_weight == 1
    assert (cg.limits.memory_min, cg.limits.pids_max) == (0, 8)


def test_demo_client_with_a_pool_lease() -> None:
    pool = AddrPool(PoolConfig.make())
    lease = pool.allocate("demo-client")
    plan = plan_create(demo("demo-client"), Allocation.from_lease(lease, 100_000), CFG)
    link = plan.ops[4]
    assert link == MakeLink("demo-client", lease.vlan, str(lease.address), str(lease.gateway))
    assert plan.ops[3] == EnsureGateway(lease.vlan, f"{lease.gateway}/24")


def test_seccomp_sets_follow_the_privileged_ops() -> None:
    m = demo("demo-web")
    plain = plan_create(m, NET, CFG).ops[-1]
    timed = plan_create(replace(m, privileges=replace(m.privileges, ops=("set_time",))),
                        NET, CFG).ops[-1]
    assert isinstance(plain, StartService) and isinstance(timed, StartService)
    base = seccomp.FilterSpec.for_cell(())
    assert set(plain.seccomp_trap) == base.trap and set(plain.seccomp_deny) == base.deny
    assert set(plain.seccomp_enosys) == base.enosys
    assert set(timed.seccomp_trap) >= seccomp.OP_SYSCALLS["set_time"]
    assert not set(timed.seccomp_trap) & set(timed.seccomp_deny)
    assert timed.filter_spec() == seccomp.FilterSpec.for_cell(("set_time",))


def test_exec_tmpfs_data_area_and_capabilities() -> None:
    m = replace(demo("demo-web"), tmpfs=(Tmpfs("/tmp", 1 << 20, exec=True),),
                data=DataDir("/var/lib/web", "demo-web", 32 << 20),
                privileges=replace(demo("demo-web").privileges,
                                   capabilities=("CAP_NET_BIND_SERVICE",)))
    plan = plan_create(m, NET, CFG)
    dirs, data_op, start = plan.ops[0], plan.ops[1], plan.ops[-1]
    assert dirs == PrepareDirs("demo-web", "/run/agent/cells/demo-web", HOSTS_WEB)
    # the image is the service's, by name; owned by the service's ids in the cell's range
    assert data_op == MountData("demo-web", "demo-web", "/var/lib/agent/data/demo-web.img",
                                "/run/agent/cells/demo-web/data", 32 << 20, 101_000, 101_000,
                                100_000, 65536, False)
    assert isinstance(start, StartService)
    mounts = {m.target: m for m in map(mount_from_wire, start.mounts)}
    assert mounts["/tmp"].flags == {"nosuid", "nodev"}
    data = mounts["/var/lib/web"]
    assert (data.kind, data.source) == ("bind", "/run/agent/cells/demo-web/data")
    assert data.flags == {"nosuid", "nodev", "noexec"}
    assert start.caps_keep == ("CAP_NET_BIND_SERVICE",)
    assert "caps net_bind_service" in start.describe()


def test_data_size_defaults_and_a_shared_data_dir_is_read_only() -> None:
    own = replace(demo("demo-client"), data=DataDir("/data", "demo-client"))
    op = plan_create(own, Allocation.from_lease(AddrPool(PoolConfig.make()).allocate(
        "demo-client"), 300_000), CFG).ops[1]
    assert isinstance(op, MountData) and op.size == CFG.data_default_size
    assert (op.uid, op.gid, op.id_base) == (301_000, 301_000, 300_000)
    reader = replace(demo("demo-web"), data=DataDir("/var/lib/web", "demo-client"))
    plan = plan_create(reader, NET, CFG)
    op, start = plan.ops[1], plan.ops[-1]
    assert op == MountData("demo-web", "demo-client", "/var/lib/agent/data/demo-client.img",
                           "/run/agent/cells/demo-web/data", 0, 0, 0, 100_000, 65536, True)
    assert "read-only" in op.describe()
    assert isinstance(start, StartService)
    mounts = {m.target: m for m in map(mount_from_wire, start.mounts)}
    assert mounts["/var/lib/web"].flags == {"ro", "nosuid", "nodev", "noexec"}
    assert mounts["/var/lib/web"].source == "/run/agent/cells/demo-web/data"


def test_the_planner_plans_what_admission_let_in() -> None:
    # the ceiling (data.max_size) is admission's (test_datavol): a cell admitted under a
    # higher one is still planned after the config changed (adoption, restarts)
    big = replace(demo("demo-web"), data=DataDir("/d", "demo-web", 512 << 20))
    op = plan_create(big, NET, CFG).ops[1]
    assert isinstance(op, MountData) and op.size == 512 << 20


def test_without_userns_the_service_ids_are_host_ids() -> None:
    cfg = replace(CFG, userns=False)
    m = replace(demo("demo-web"), data=DataDir("/d", "demo-web"))
    plan = plan_create(m, replace(NET, uid_base=None), cfg)
    assert plan.ops[0] == PrepareDirs("demo-web", "/run/agent/cells/demo-web", HOSTS_WEB)
    data = plan.ops[1]
    assert isinstance(data, MountData)
    assert (data.uid, data.gid, data.id_base, data.id_count) == (1000, 1000, 0, 2**32 - 1)
    start = plan.ops[-1]
    assert isinstance(start, StartService) and start.userns_base is None


@pytest.mark.parametrize(("alloc", "match"), [
    (Allocation(uid_base=1), "no VLAN/address lease"),
    (replace(NET, vlan=101), "asks for VLAN 100 but was allocated VLAN 101"),
    (replace(NET, uid_base=None), "no uid range"),
])
def test_inconsistent_allocations_are_refused(alloc: Allocation, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as ei:
        plan_create(demo("demo-web"), alloc, CFG)
    assert ei.value.code == "E_PLAN"


def test_restart_and_destroy_plans() -> None:
    m = demo("demo-web")
    restart = plan_restart(m, NET, CFG)
    assert restart.purpose == "restart" and restart.ops == (plan_create(m, NET, CFG).ops[-1],)
    d = plan_destroy(m, CFG, NET)
    assert [type(op) for op in d.ops] == [KillCell, RemoveLink, RemoveNetns, RemoveCgroup,
                                          ReleaseDirs]
    assert d.ops[-1] == ReleaseDirs("demo-web", "/run/agent/cells/demo-web")
    with_data = plan_destroy(replace(m, data=DataDir("/d", "demo-web")), CFG, NET)
    assert with_data.ops[-2:] == (UnmountData("demo-web", "/run/agent/cells/demo-web/data"),
                                  ReleaseDirs("demo-web", "/run/agent/cells/demo-web"))
    assert "image and its data are kept" in with_data.ops[-2].describe()
    assert UnmountData("demo-web", "/run/agent/cells/demo-web/data") in plan_destroy(
        "demo-web", CFG).ops  # no manifest (a repair): unmount whatever may be there
    last = plan_destroy("demo-web", CFG, NET, last_on_vlan=True)
    assert last.ops[-1] == RemoveGateway("demo-web", 100) and last.purpose == "destroy"


def test_explain_is_the_dry_run_text() -> None:
    lines = plan_create(demo("demo-web"), NET, CFG).explain()
    assert lines[0].startswith("plan create-demo-web-") and lines[0].endswith(
        ": create demo-web, 6 operations")
    assert lines[1:6] == [
        "1. create run dir /run/agent/cells/demo-web, hosts (demo-web)",
        "2. create cgroup demo-web: cpu.max 50000/100000 weight 10, memory min 8M high 32M "
        "max 32M, pids 32, io 100",
        "3. create network namespace cell-demo-web",
        "4. ensure gateway 10.77.0.1/24 on VLAN 100",
        "5. connect demo-web: veth vc-1407cc80e43d untagged on VLAN 100, eth0 10.77.0.2/24 "
        "via 10.77.0.1",
    ]
    assert lines[6].startswith("6. start `/bin/busybox httpd -f -p 8080 -h /www` as 1000:1000 "
                               "(host 101000:101000) in demo-web: image "
                               "/usr/share/agent/images/demo ro, mounts /proc /dev "
                               "/tmp(nodev,noexec,nosuid) /etc/hosts, caps none, seccomp trap ")


def test_hosts_file_names_the_manifest_peers_known_at_creation() -> None:
    client = demo("demo-client")  # peers = [demo-web]
    alloc = Allocation(100, "10.77.0.3/24", "10.77.0.1", 100_000)
    known = {"demo-web": "10.77.0.2", "other": "10.77.5.2"}
    text = hosts_file(client, alloc, known)
    assert text == ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
                    "10.77.0.3\tdemo-client\n10.77.0.2\tdemo-web\n")
    assert "other" not in text  # not a peer of the manifest: not named
    assert hosts_file(client, alloc, {}).splitlines()[-1] == "10.77.0.3\tdemo-client"
    echo = hosts_file(demo("demo-echo"), Allocation(uid_base=0), known)
    assert echo.splitlines()[-1] == "127.0.1.1\tdemo-echo"  # loopback-only cell


def test_plan_create_takes_peer_addresses_from_hosts_or_firewall_peers() -> None:
    from agent.core.firewall import CellFw

    client = demo("demo-client")
    alloc = Allocation(100, "10.77.0.3/24", "10.77.0.1", 100_000)
    web = CellFw.of(demo("demo-web"), 100, "10.77.0.2/24")
    assert web is not None
    for plan in (plan_create(client, alloc, CFG, hosts={"demo-web": "10.77.0.2"}),
                 plan_create(client, alloc, CFG, peers=[web])):
        dirs = plan.ops[0]
        assert isinstance(dirs, PrepareDirs) and "10.77.0.2\tdemo-web" in dirs.hosts
    bare = plan_create(client, alloc, CFG).ops[0]
    assert isinstance(bare, PrepareDirs) and "demo-web" not in bare.hosts


def test_cpu_weight_formula() -> None:
    assert [cpu_weight(x) for x in (0, 1, 10, 100, 1000, 2500, 10**6, 10**7)] == [
        1, 1, 1, 10, 100, 250, 10_000, 10_000]


@settings(deadline=None)  # a loaded machine is not a failure (docs/testing.md)
@given(cpu_min=st.integers(0, 1_024_000), extra=st.integers(0, 1_024_000),
       mem_min=st.integers(0, 1 << 30), mem_extra=st.integers(0, 1 << 30),
       pids=st.integers(1, 65536), io=st.integers(1, 10000))
def test_limits_for_any_valid_resources(cpu_min: int, extra: int, mem_min: int,
                                        mem_extra: int, pids: int, io: int) -> None:
    r = Resources(cpu_min, max(10, cpu_min + extra), mem_min, max(1 << 20, mem_min + mem_extra),
                  pids, io)
    lim = cgroup_limits(replace(demo("demo-echo"), resources=r))
    quota, period = map(int, lim.cpu_max_line().split())
    assert period == 100_000 and quota == max(1000, r.cpu_max * 100)
    assert lim.memory_high == lim.memory_max == r.memory_max and lim.memory_min == r.memory_min
    assert (lim.pids_max, lim.io_weight) == (pids, io)
    assert 1 <= lim.cpu_weight <= 10_000
    assert lim.cpu_weight >= min(10_000, cpu_min // 10)


def test_every_privileged_op_maps_to_a_seccomp_entry() -> None:
    assert set(PRIVILEGED_OPS) == set(seccomp.OP_SYSCALLS)
