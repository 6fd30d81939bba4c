"""The operations that create a cell (the create half of a plan; teardown.py holds
the destroy half).  The operations cell plans are made of (see agent.core.plan for the contract).

Each is a frozen dataclass whose fields are the journaled arguments; ``apply`` and
``undo`` delegate to the adapters on the executor's context (:class:`CellContext`), so
the same op runs against the kernel in agentd and against a recording fake in tests.

Create steps undo themselves, tolerating partial application and empty undo data (the
executor's repair after a crash).  Destroy steps (``Kill*``/``Remove*``/``Release*``)
have a no-op undo: putting back what a failed destroy already removed would resurrect
half a cell.  Every destroy step is idempotent instead, so a failed destroy plan is
simply run again (the lifecycle's FAILED -> STOP_REQUESTED -> DESTROYING) or its
leftovers are collected by the reclaim loop.

Paths and syscall sets are planned by pure code (agent.core.planner) and journaled with the
op; the privileged side re-checks each path against its own roots before touching it
(bubblewrap's habit), so a tampered journal cannot make agentd delete or mount elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from agent.core import seccomp, units
from agent.core.cellctx import CellContext, DataMount, same_path
from agent.core.cgroup import Limits
from agent.core.errors import ConfigError
from agent.core.names import HOSTS_FILE, HOSTS_TARGET, NETNS_PREFIX, veth_names
from agent.core.plan import DataOp, register_op
from agent.core.sandbox import Mount, SpawnSpec, UidMap

__all__ = ["ApplyCellFirewall", "EnsureGateway", "MakeCgroup", "MakeLink", "MakeNetns",
           "MountData", "MountWire", "PrepareDirs", "StartService", "mount_from_wire",
           "mount_to_wire"]


@register_op
@dataclass(frozen=True)
class PrepareDirs(DataOp):
    """The cell's run dir (0700).

    With ``hosts`` (the text of the cell's /etc/hosts) the run dir also holds the file
    ``hosts`` (0644) and is 0711, so the cell's mapped root can reach the file for the
    read-only bind mount over /etc/hosts (and the data mount below it); everything
    else in the dir stays 0600."""

    kind: ClassVar[str] = "prepare-dirs"
    cell: str
    run_dir: str
    hosts: str = ""  # "" = no hosts file

    def describe(self) -> str:
        data = ""
        if self.hosts:
            names = [ln.split()[1] for ln in self.hosts.splitlines()[2:] if len(ln.split()) > 1]
            data += f", {HOSTS_FILE} ({' '.join(names)})"
        return f"create run dir {self.run_dir}{data}"

    def apply(self, ctx: CellContext) -> Mapping[str, Any]:
        run = same_path(self.run_dir, ctx.paths.cell_run_dir(self.cell), "run dir")
        try:
            ctx.dirs.make_run_dir(run, self.hosts)
        except BaseException:
            self.undo(ctx, {})
            raise
        return {}

    def undo(self, ctx: CellContext, undo_data: Mapping[str, Any]) -> None:
        ctx.dirs.discard_run_dir(same_path(self.run_dir, ctx.paths.cell_run_dir(self.cell),
                                       "run dir"))


@register_op
@dataclass(frozen=True)
class MountData(DataOp):
    """The data image of service ``source`` mounted at the cell's data mount point
    (docs/data-dirs.md).  The owner's image is made on first use (sparse, ext4, its root
    owned by the service's mapped ids), checked (``e2fsck -p``) when nothing has it
    mounted, grown to ``size`` and re-owned if its files belong to another uid range; a
    reader (``readonly``, size 0) only mounts an image that exists, read-only.

    Undo unmounts; the image is never deleted (not by undo, not by destroy)."""

    kind: ClassVar[str] = "mount-data"
    cell: str
    source: str  # the service whose data image it is (the cell's own unless shared)
    image: str
    mount: str
    size: int = 0  # bytes; 0: a reader
    uid: int = 0  # host ids owning the image's root (the service's mapped uid/gid)
    gid: int = 0
    id_base: int = 0  # the cell's mapped range (0, 2**32-1: no user namespace)
    id_count: int = 0
    readonly: bool = False

    def describe(self) -> str:
        if self.readonly:
            return (f"mount the data dir of service {self.source} read-only (shared by the "
                    f"policy): image {self.image} at {self.mount}")
        return (f"mount data dir: image {self.image} (ext4, {units.format_size(self.size)}, "
                f"made if missing, root {self.uid}:{self.gid}) at {self.mount}")

    def _request(self, ctx: CellContext) -> DataMount:
        image = same_path(self.image, ctx.paths.data_image(self.source), "data image")
        mount = same_path(self.mount, ctx.paths.data_mount(self.cell), "data mount")
        if self.readonly != (self.source != self.cell) or self.readonly != (self.size == 0):
            raise ConfigError("E_PLAN", f"data mount of {self.cell}: a cell owns its own "
                              "data image read-write and mounts another's read-only",
                              "the plan was not made by agent.core.planner")
        return DataMount(image, mount, self.size, self.uid, self.gid, self.id_base,
                         self.id_count, self.readonly)

    def apply(self, ctx: CellContext) -> Mapping[str, Any]:
        return ctx.dirs.mount_data(self._request(ctx))

    def undo(self, ctx: CellContext, undo_data: Mapping[str, Any]) -> None:
        ctx.dirs.unmount_data(same_path(self.mount, ctx.paths.data_mount(self.cell),
                                        "data mount"))


@register_op
@dataclass(frozen=True)
class MakeCgroup(DataOp):
    """The cell's cgroup leaf with its limits."""

    kind: ClassVar[str] = "make-cgroup"
    cell: str
    limits: Limits

    def describe(self) -> str:
        lim = self.limits

        def size(v: int | None) -> str:
            return "max" if v is None else units.format_size(v)

        return (f"create cgroup {self.cell}: cpu.max {lim.cpu_max_line().replace(' ', '/')} "
                f"weight {lim.cpu_weight}, memory min {size(lim.memory_min)} high "
                f"{size(lim.memory_high)} max {size(lim.memory_max)}, pids "
                f"{lim.pids_max if lim.pids_max is not None else 'max'}, io {lim.io_weight}")

    def to_wire(self) -> dict[str, Any]:
        return {"cell": self.cell, "limits": dataclasses.asdict(self.limits)}

    @classmethod
    def from_wire(cls, args: Mapping[str, Any]) -> MakeCgroup:
        return cls(args["cell"], Limits(**args["limits"]))

    def apply(self, ctx: CellContext) -> Mapping[str, Any]:
        path = ctx.cgroup.create(self.cell)
        try:
            ctx.cgroup.set_limits(self.cell, self.limits)
        except BaseException:
            ctx.cgroup.remove(self.cell)
            raise
        return {"path": str(path)}

    def undo(self, ctx: CellContext, undo_data: Mapping[str, Any]) -> None:
        ctx.cgroup.kill(self.cell)  # a cgroup with processes cannot be removed
        ctx.cgroup.remove(self.cell)


@register_op
@dataclass(frozen=True)
class MakeNetns(DataOp):
    """The cell's network namespace, pinned and owned by the agent."""

    kind: ClassVar[str] = "make-netns"
    cell: str

    def describe(self) -> str:
        return f"create network namespace {NETNS_PREFIX}{self.cell}"

    def apply(self, ctx: CellContext) -> Mapping[str, Any]:
        return {"path": str(ctx.net.create_netns(self.cell))}

    def undo(self, ctx: CellContext, undo_data: Mapping[str, Any]) -> None:
        ctx.net.destroy_netns(self.cell)


@register_op
@dataclass(frozen=True)
class EnsureGateway(DataOp):
    """The host's gateway on the cell's VLAN; shared by the VLAN's cells, so undo removes
    it only if this step created it."""

    kind: ClassVar[str] = "ensure-gateway"
    vlan: int
    gateway: str  # with prefix, e.g. 10.77.0.1/24

    def describe(self) -> str:
        return f"ensure gateway {self.gateway} on VLAN {self.vlan}"

    def apply(self, ctx: CellContext) -> Mapping[str, Any]:
        return {"created": ctx.net.ensure_gateway(self.vlan, self.gateway)}

    def undo(self, ctx: CellContext, undo_data: Mapping[str, Any]) -> None:
        if undo_data.get("created") is True:  # unknown (crash): leave it to reclaim
            ctx.net.remove_gateway(self.vlan)


@register_op
@dataclass(frozen=True)
class MakeLink(DataOp):
    """The cell's veth: host side an untagged port of its VLAN, eth0 inside."""

    kind: ClassVar[str] = "make-link"
    cell: str
    vlan: int
    address: str  # with prefix
    gateway: str  # address only

    def describe(self) -> str:
        host, _ = veth_names(self.cell)
        return (f"connect {self.cell}: veth {host} untagged on VLAN {self.vlan}, "
                f"eth0 {self.address} via {self.gateway}")

    def apply(self, ctx: CellContext) -> Mapping[str, Any]:
        ctx.net.create_link(self.cell, self.vlan, self.address, self.gateway)
        return {}

    def undo(self, ctx: CellContext, undo_data: Mapping[str, Any]) -> None:
        ctx.net.destroy_link(self.cell)


@register_op
@dataclass(frozen=True)
class ApplyCellFirewall(DataOp):
    """The cell's ``inet agent_cell`` table (agent.core.firewall), applied in its netns before
    its service starts.  The netns belongs to the host's user namespace, so the cell's
    root cannot change the table; undo deletes it (the netns usually goes next anyway)."""

    kind: ClassVar[str] = "apply-cell-firewall"
    cell: str
    batch: str  # agent.core.firewall.batch_json(cell_ruleset(...))

    def _cmds(self) -> list[dict[str, Any]]:
        return [c for c in json.loads(self.batch)["nftables"] if "metainfo" not in c]

    def describe(self) -> str:
        counts = {"input": 0, "output": 0}
        accepts: list[str] = []
        for c in self._cmds():
            rule = c.get("add", {}).get("rule")
            if rule is None:
                continue
            counts[rule["chain"]] = counts.get(rule["chain"], 0) + 1
            note = str(rule.get("comment", ""))
            if note.startswith(("peer ", "egress ")):
                accepts.append(f"{rule['chain']} {note}")
        allowed = "; ".join(accepts) or "nothing but replies and loopback"
        return (f"apply firewall inet agent_cell in {NETNS_PREFIX}{self.cell} "
                f"({counts['input']} input, {counts['output']} output rules): {allowed}")

    def apply(self, ctx: CellContext) -> Mapping[str, Any]:
        fw = getattr(ctx, "firewall", None)
        if fw is None:
            raise ConfigError("E_FIREWALL", f"no firewall adapter: cell {self.cell} would run "
                              "unfiltered", "give the executor's context a firewall "
                              "(agent.kernel.nft.FirewallSync)")
        fw.apply_cell(self.cell, self._cmds())
        return {}

    def undo(self, ctx: CellContext, undo_data: Mapping[str, Any]) -> None:
        fw = getattr(ctx, "firewall", None)
        if fw is not None:
            fw.remove_cell(self.cell)


def _argv_line(argv: tuple[str, ...]) -> str:
    """argv for a human: words with spaces or quotes are shown quoted (no shlex: it would
    pull python3-shell into the firmware for one log line)."""
    return " ".join(a if a and not any(c in a for c in " '\"\\\t\n") else repr(a)
                    for a in argv)


# (kind, target, size, flags, source, mode[, optional]): ``optional`` only when true, so
# journals written before it existed still decode.
MountWire = tuple[Any, ...]


def mount_to_wire(m: Mount) -> MountWire:
    w = (m.kind, m.target, m.size, tuple(sorted(m.flags)), m.source, m.mode)
    return (*w, True) if m.optional else w


def mount_from_wire(w: MountWire) -> Mount:
    kind, target, size, flags, source, mode, *rest = w
    return Mount(kind, target, size, frozenset(flags), source, mode, bool(rest and rest[0]))


@register_op
@dataclass(frozen=True)
class StartService(DataOp):
    """Spawn the cell's pid 1 (agent.kernel.spawn) in its netns and cgroup."""

    kind: ClassVar[str] = "start-service"
    cell: str
    argv: tuple[str, ...]
    rootfs: str
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = "/"
    uid: int = 0  # inside the cell
    gid: int = 0
    userns_base: int | None = None  # None: no user namespace
    userns_count: int = 65536
    mounts: tuple[MountWire, ...] = ()
    caps_keep: tuple[str, ...] = ()
    rlimits: tuple[tuple[str, int, int], ...] = ()
    seccomp_trap: tuple[str, ...] = ()
    seccomp_deny: tuple[str, ...] = ()
    seccomp_enosys: tuple[str, ...] = ()

    def describe(self) -> str:
        ids = f"{self.uid}:{self.gid}"
        if self.userns_base is not None:
            ids += f" (host {self.userns_base + self.uid}:{self.userns_base + self.gid})"
        areas = " ".join(m[1] if m[0] != "tmpfs" else f"{m[1]}({','.join(m[3])})"
                         for m in self.mounts)
        caps = ",".join(c.removeprefix("CAP_").lower() for c in self.caps_keep) or "none"
        return (f"start `{_argv_line(self.argv)}` as {ids} in {self.cell}: image {self.rootfs} "
                f"ro, mounts {areas}, caps {caps}, seccomp trap {len(self.seccomp_trap)} "
                f"deny {len(self.seccomp_deny)} enosys {len(self.seccomp_enosys)}")

    def filter_spec(self) -> seccomp.FilterSpec:
        return seccomp.FilterSpec(trap=frozenset(self.seccomp_trap),
                                  deny=frozenset(self.seccomp_deny),
                                  enosys=frozenset(self.seccomp_enosys))

    def spawn_spec(self, ctx: CellContext) -> SpawnSpec:
        """The SpawnSpec, with every host path re-checked against ctx's roots."""
        mounts = tuple(mount_from_wire(m) for m in self.mounts)
        for m in mounts:
            if m.kind == "bind" and m.target == HOSTS_TARGET:
                same_path(m.source or "", ctx.paths.cell_run_dir(self.cell) / HOSTS_FILE,
                      "hosts file")
            elif m.kind == "bind":
                same_path(m.source or "", ctx.paths.data_mount(self.cell), "bind source")
        prog = seccomp.compile_filter(self.filter_spec())
        return SpawnSpec(
            argv=self.argv, rootfs=self.rootfs, env=self.env, cwd=self.cwd,
            hostname=self.cell, mounts=mounts,
            userns=None if self.userns_base is None else UidMap(self.userns_base,
                                                                self.userns_count),
            netns_path=str(ctx.net.netns_path(self.cell)),
            cgroup_path=str(ctx.cgroup.leaf(self.cell)),
            caps_keep=frozenset(self.caps_keep), rlimits=self.rlimits, no_new_privs=True,
            seccomp=seccomp.pack(prog), uid=self.uid, gid=self.gid)

    def apply(self, ctx: CellContext) -> Mapping[str, Any]:
        return {"pid": ctx.spawner.start(self.cell, self.spawn_spec(ctx))}

    def undo(self, ctx: CellContext, undo_data: Mapping[str, Any]) -> None:
        pid = undo_data.get("pid")
        ctx.spawner.stop(self.cell, pid if isinstance(pid, int) else None)
        ctx.cgroup.kill(self.cell)  # and anything pid 1 left behind


