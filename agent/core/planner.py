"""Manifest + allocation -> ordered cell operations (design step C), purely.

The order of a create plan, and why it is safe::

    prepare-dirs     run dir (with the cell's /etc/hosts)
    mount-data       the service's data image (made, checked, grown, owned by the cell's
                     mapped ids) mounted below the run dir; another's read-only if shared
    make-cgroup      the leaf and its limits exist before any process could join it
    make-netns       agent-owned netns: created outside the cell's user namespace
    ensure-gateway   the VLAN's gateway on the host (only with [network])
    make-link        veth into the netns, untagged port of the cell's VLAN
    apply-cell-firewall  its nftables table in the netns (when planned with ``peers``)
    start-service    last: the process starts inside everything above, already limited

If step *k* fails the executor undoes *k-1..0*, so a half-made cell never runs.  A destroy
plan kills first (nothing can hold the rest busy), then removes link, netns, cgroup,
the data mount (the image stays) and the run dir.  ``Plan.explain()`` of these plans
is what ``agentctl run --dry-run`` shows.

Derivations (docs/lifecycle.md has the rationale):

* ``cpu.max``   = ``cpu_max`` as quota per 100000 us period (``500m`` -> ``50000 100000``);
* ``cpu.weight``= ``clamp(ceil(cpu_min / 10m), 1, 10000)``: 100 per guaranteed CPU, the
  kernel's default for one CPU's worth.  Admission keeps the sum of ``cpu_min`` within the
  CPUs cells may use, so under full contention each cell's share, proportional to its
  weight, is at least its ``cpu_min``; a cell with no minimum gets weight 1 (best effort);
* ``memory.min`` = ``memory_min``; ``memory.max`` = ``memory_max``; ``memory.high`` starts at
  ``memory_max`` (the tuner lowers it); ``pids.max`` = ``pids_max``; ``io.weight`` = ``io_weight``;
* mounts: the image is the read-only root; ``/proc``, a minimal ``/dev``, each tmpfs area
  ``nosuid,nodev`` plus ``noexec`` unless ``exec = true``; the data area is a bind of
  the data mount ``<run_dir>/cells/<cell>/data`` ``nosuid,nodev,noexec`` (plus ``ro``
  for another service's data dir), docs/data-dirs.md;
* rlimits: :data:`RLIMITS`; capabilities: exactly the manifest's; seccomp:
  :meth:`agent.core.seccomp.FilterSpec.for_cell` of the manifest's privileged operations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from agent.core import datavol, firewall
from agent.core.addrpool import Lease
from agent.core.cellctx import Paths
from agent.core.cellops import (
    ApplyCellFirewall,
    EnsureGateway,
    MakeCgroup,
    MakeLink,
    MakeNetns,
    MountData,
    PrepareDirs,
    StartService,
    mount_to_wire,
)
from agent.core.cgroup import Limits
from agent.core.config import AgentConfig
from agent.core.errors import ConfigError
from agent.core.manifest import Manifest
from agent.core.names import HOSTS_FILE, HOSTS_TARGET
from agent.core.plan import Operation, Plan
from agent.core.sandbox import DEFAULT_MOUNTS, Mount
from agent.core.seccomp import FilterSpec
from agent.core.teardown import (
    KillCell,
    ReleaseDirs,
    RemoveCgroup,
    RemoveGateway,
    RemoveLink,
    RemoveNetns,
    UnmountData,
)

__all__ = [
    "CPU_PERIOD_US",
    "RLIMITS",
    "Allocation",
    "cell_firewall",
    "cgroup_limits",
    "cpu_weight",
    "filter_spec",
    "hosts_file",
    "mount_data",
    "plan_create",
    "plan_destroy",
    "plan_restart",
    "start_service",
]

CPU_PERIOD_US = 100_000
# (name, soft, hard): enough descriptors for a server, no core dumps (they would land in
# the read-only image or leak memory contents), no real-time scheduling.
RLIMITS: tuple[tuple[str, int, int], ...] = (("nofile", 1024, 4096), ("core", 0, 0),
                                             ("rtprio", 0, 0))


@dataclass(frozen=True)
class Allocation:
    """What admission handed the cell: its VLAN, address and gateway (all None for a
    loopback-only cell) and the first host uid of its user namespace (None: no userns)."""

    vlan: int | None = None
    address: str | None = None  # with prefix, e.g. 10.77.0.2/24
    gateway: str | None = None  # address only, e.g. 10.77.0.1
    uid_base: int | None = None

    @classmethod
    def from_lease(cls, lease: Lease | None, uid_base: int | None) -> Allocation:
        if lease is None:
            return cls(uid_base=uid_base)
        return cls(lease.vlan, str(lease.address), str(lease.gateway), uid_base)

    def gateway_interface(self) -> str:
        """The gateway with the cell subnet's prefix (what the host's VLAN interface holds)."""
        addr = IPv4Interface(self.address or "")
        return f"{IPv4Address(self.gateway or '')}/{addr.network.prefixlen}"


def cpu_weight(cpu_min: int) -> int:
    """``cpu.weight`` for a guaranteed ``cpu_min`` millicpu (see the module docstring)."""
    return max(1, min(10_000, -(-cpu_min // 10)))


def cgroup_limits(m: Manifest) -> Limits:
    r = m.resources
    return Limits(cpu_max_millicores=r.cpu_max, cpu_weight=cpu_weight(r.cpu_min),
                  memory_min=r.memory_min, memory_high=r.memory_max, memory_max=r.memory_max,
                  pids_max=r.pids_max, io_weight=r.io_weight, cpu_period_us=CPU_PERIOD_US)


def filter_spec(m: Manifest) -> FilterSpec:
    return FilterSpec.for_cell(m.privileges.ops)


def _paths(config: AgentConfig) -> Paths:
    return Paths(Path(config.state_dir), Path(config.run_dir))


def _mounts(m: Manifest, paths: Paths) -> tuple[Mount, ...]:
    out = list(DEFAULT_MOUNTS)
    for t in m.tmpfs:
        flags = {"nosuid", "nodev"} | (set() if t.exec else {"noexec"})
        out.append(Mount("tmpfs", t.path, size=t.size, flags=frozenset(flags)))
    if m.data is not None:
        ro = {"ro"} if datavol.is_reader(m) else set()
        out.append(Mount("bind", m.data.path, source=str(paths.data_mount(m.name)),
                         flags=frozenset({"nosuid", "nodev", "noexec"} | ro)))
    # Last, so a writable area on /etc cannot hide it; skipped if the image has no
    # /etc/hosts to mount over.
    out.append(Mount("bind", HOSTS_TARGET, source=str(paths.cell_run_dir(m.name) / HOSTS_FILE),
                     flags=frozenset({"ro", "nosuid", "nodev", "noexec"}), optional=True))
    return tuple(out)


def hosts_file(m: Manifest, alloc: Allocation, peers: Mapping[str, str]) -> str:
    """The cell's /etc/hosts: localhost, the cell's own name (its address, or 127.0.1.1
    without a network) and each manifest peer found in ``peers`` (name -> address, as
    leased when the cell is created; a peer started later is not added)."""
    own = str(IPv4Interface(alloc.address).ip) if alloc.address else "127.0.1.1"
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost", f"{own}\t{m.name}"]
    wanted = [] if m.network is None else [p.cell for p in m.network.peers]
    for name in dict.fromkeys(wanted):
        addr = peers.get(name)
        if addr:
            lines.append(f"{IPv4Interface(addr).ip}\t{name}")
    return "\n".join(lines) + "\n"


def _check(m: Manifest, alloc: Allocation, config: AgentConfig) -> None:
    if m.network is not None and None in (alloc.vlan, alloc.address, alloc.gateway):
        raise ConfigError("E_PLAN", f"cell {m.name} has [network] but no VLAN/address lease",
                          "allocate from the address pool before planning")
    if m.network is not None and m.network.vlan != "auto" and m.network.vlan != alloc.vlan:
        raise ConfigError("E_PLAN", f"cell {m.name} asks for VLAN {m.network.vlan} but was "
                          f"allocated VLAN {alloc.vlan}", "allocate with vlan=manifest's vlan")
    if config.userns and alloc.uid_base is None:
        raise ConfigError("E_PLAN", f"cell {m.name}: user namespaces are on but no uid range "
                          "was allocated", "pass Allocation(uid_base=...)")


def mount_data(m: Manifest, alloc: Allocation, config: AgentConfig) -> MountData:
    """The data step: the service's own image read-write (made at its size, owned by the
    service's mapped ids), or another service's read-only (the policy shares it)."""
    assert m.data is not None
    paths = _paths(config)
    base = alloc.uid_base if config.userns and alloc.uid_base is not None else 0
    count = config.uid_size if config.userns else 2**32 - 1
    image, mount = str(paths.data_image(m.data.source)), str(paths.data_mount(m.name))
    size = datavol.planned_size(m, config)  # (its ceiling is admission's: datavol.admit)
    if size is None:  # another service's data dir
        return MountData(m.name, m.data.source, image, mount, 0, 0, 0, base, count, True)
    return MountData(m.name, m.data.source, image, mount, size, base + m.service.uid,
                     base + m.service.gid, base, count, False)


def start_service(m: Manifest, alloc: Allocation, config: AgentConfig) -> StartService:
    """The spawn step: every SpawnSpec field derived from the manifest."""
    _check(m, alloc, config)
    s = m.service
    base = alloc.uid_base if config.userns else None
    fs = filter_spec(m)
    return StartService(
        cell=m.name, argv=(s.command, *s.args), rootfs=m.image_root, env=s.env, cwd=s.workdir,
        uid=s.uid, gid=s.gid, userns_base=base, userns_count=config.uid_size,
        mounts=tuple(mount_to_wire(x) for x in _mounts(m, _paths(config))),
        caps_keep=m.privileges.capabilities, rlimits=RLIMITS,
        seccomp_trap=tuple(sorted(fs.trap)), seccomp_deny=tuple(sorted(fs.deny)),
        seccomp_enosys=tuple(sorted(fs.enosys)))


def cell_firewall(m: Manifest, alloc: Allocation) -> firewall.CellFw | None:
    """What agent.core.firewall needs about the cell (None: loopback only)."""
    return firewall.CellFw.of(m, alloc.vlan, alloc.address, alloc.gateway)


def plan_create(m: Manifest, alloc: Allocation, config: AgentConfig, *,
                peers: Iterable[firewall.CellFw] | None = None,
                hosts: Mapping[str, str] | None = None) -> Plan:
    """``peers``: the other networked cells, for the cell's firewall table; ``None`` plans
    no firewall step (an agent without nftables).  ``hosts``: cell name -> address of the
    other cells for the cell's /etc/hosts; ``None`` takes them from ``peers``."""
    peers = None if peers is None else list(peers)
    if hosts is None:
        hosts = {p.name: p.address for p in peers or ()}
    _check(m, alloc, config)
    paths = _paths(config)
    ops: list[Operation] = [
        PrepareDirs(m.name, str(paths.cell_run_dir(m.name)), hosts=hosts_file(m, alloc, hosts))]
    if m.data is not None:
        ops.append(mount_data(m, alloc, config))
    ops += [MakeCgroup(m.name, cgroup_limits(m)), MakeNetns(m.name)]
    if m.network is not None:
        assert alloc.vlan is not None and alloc.address and alloc.gateway
        ops += [EnsureGateway(alloc.vlan, alloc.gateway_interface()),
                MakeLink(m.name, alloc.vlan, alloc.address, alloc.gateway)]
        me = cell_firewall(m, alloc)
        if peers is not None and me is not None:
            batch = firewall.cell_ruleset(me, peers)
            ops.append(ApplyCellFirewall(m.name, firewall.batch_json(batch)))
    ops.append(start_service(m, alloc, config))
    return Plan.new(m.name, "create", ops)


def plan_restart(m: Manifest, alloc: Allocation, config: AgentConfig) -> Plan:
    """Start the service again in the cell it already has (after BACKOFF)."""
    return Plan.new(m.name, "restart", [start_service(m, alloc, config)])


def plan_destroy(cell: Manifest | str, config: AgentConfig, alloc: Allocation | None = None,
                 *, last_on_vlan: bool = False) -> Plan:
    """Tear the cell down; with ``last_on_vlan`` also the VLAN's gateway."""
    name = cell.name if isinstance(cell, Manifest) else cell
    paths = _paths(config)
    ops: list[Operation] = [KillCell(name), RemoveLink(name), RemoveNetns(name),
                            RemoveCgroup(name)]
    if not isinstance(cell, Manifest) or cell.data is not None:  # (unknown: unmount anyway)
        ops.append(UnmountData(name, str(paths.data_mount(name))))
    ops.append(ReleaseDirs(name, str(paths.cell_run_dir(name))))
    if last_on_vlan and alloc is not None and alloc.vlan is not None:
        ops.append(RemoveGateway(name, alloc.vlan))
    return Plan.new(name, "destroy", ops)
