"""What a cell plan's operations need from the executor's context (the adapters).

Each protocol here is the narrow view one kind of op has of an adapter: the cgroup
backend, the host network, the spawner, the cell's directories, the firewall.  agentd
passes the real adapters (:class:`Context`); tests pass recording fakes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.core.cgroup import Limits
from agent.core.errors import AgentError, ConfigError
from agent.core.names import check_cell_name
from agent.core.sandbox import SpawnSpec

__all__ = ["CellCgroups", "CellContext", "CellDirs", "CellFirewall", "CellNet", "Context",
           "DataMount", "Paths", "Spawner", "same_path"]



class CellCgroups(Protocol):
    """agent.kernel.cgroup.CgroupBackend plus ``leaf`` (agent.kernel.cgroupv2.CgroupV2 has both)."""

    def create(self, cell: str) -> Path: ...
    def set_limits(self, cell: str, limits: Limits) -> None: ...
    def kill(self, cell: str, timeout: float = 5.0) -> None: ...
    def remove(self, cell: str, timeout: float = 5.0) -> None: ...
    def leaf(self, cell: str) -> Path: ...


class CellNet(Protocol):
    """agent.kernel.net's functions bound to a netlink handle, bridge and netns dir (HostNet)."""

    def create_netns(self, cell: str) -> Path: ...
    def destroy_netns(self, cell: str) -> None: ...
    def netns_path(self, cell: str) -> Path: ...
    def ensure_gateway(self, vlan: int, gateway: str) -> bool: ...
    def remove_gateway(self, vlan: int) -> None: ...
    def create_link(self, cell: str, vlan: int, address: str, gateway: str) -> None: ...
    def destroy_link(self, cell: str) -> None: ...


class Spawner(Protocol):
    """Starts a cell's pid 1 and owns what comes back (pidfd, seccomp listener, stdio:
    it registers them with the loop and wires stdout/stderr to the cell's log buffer)."""

    def start(self, cell: str, spec: SpawnSpec) -> int:
        """spawn_cell(spec) with stdio filled in; returns the host pid of pid 1."""
        ...

    def stop(self, cell: str, pid: int | None) -> None:
        """SIGKILL and reap pid 1 (``None``: whatever was started for ``cell``), close
        its fds.  Already gone is success."""
        ...




@dataclass(frozen=True)
class Paths:
    state_dir: Path
    run_dir: Path

    def cell_run_dir(self, cell: str) -> Path:
        return self.run_dir / "cells" / check_cell_name(cell)

    @property
    def images_dir(self) -> Path:
        """Where the data images live (on the state file system)."""
        return self.state_dir / "data"

    def data_image(self, service: str) -> Path:
        """The data image of ``service``: keyed by the service's name, never by order."""
        try:
            check_cell_name(service)
        except AgentError:
            raise ConfigError("E_PATH", f"data source {service!r} is not a service name",
                              "a data dir belongs to a service") from None
        return self.images_dir / f"{service}.img"

    def data_mount(self, cell: str) -> Path:
        """Where the cell's data image is mounted on the host, below its run dir (so the
        reclaim loop collects it with the cell's other mounts if the cell is forgotten)."""
        return self.cell_run_dir(cell) / "data"


class CellFirewall(Protocol):
    """agent.kernel.nft.FirewallSync: nft batches applied in a cell's netns."""

    def apply_cell(self, cell: str, batch: Sequence[dict[str, Any]]) -> None: ...
    def remove_cell(self, cell: str) -> None: ...


class CellDirs(Protocol):
    """agent.kernel.dirs.CellDirs: the cell's run dir and its data image's mount."""

    def make_run_dir(self, run: Path, hosts: str) -> None: ...
    def discard_run_dir(self, run: Path) -> None: ...
    def remove_run_dir(self, run: Path) -> None: ...
    def mount_data(self, req: DataMount) -> Mapping[str, Any]: ...
    def unmount_data(self, mount: Path) -> None: ...


@dataclass(frozen=True)
class DataMount:
    """What :class:`agent.core.cellops.MountData` asks of the adapter (paths checked).

    ``size`` 0: a reader, which never creates, grows or re-owns the image; else the
    image is made (ext4, root owned by ``uid:gid``) if missing and grown to ``size``.
    ``id_base``/``id_count``: the host ids the cell's user namespace maps (0 and
    2**32-1 without one): files owned by another range are shifted into this one."""

    image: Path
    mount: Path
    size: int
    uid: int
    gid: int
    id_base: int
    id_count: int
    readonly: bool


class CellContext(Protocol):
    @property
    def cgroup(self) -> CellCgroups: ...
    @property
    def net(self) -> CellNet: ...
    @property
    def spawner(self) -> Spawner: ...
    @property
    def paths(self) -> Paths: ...
    @property
    def dirs(self) -> CellDirs: ...
    @property
    def firewall(self) -> CellFirewall | None: ...


@dataclass(frozen=True)
class Context:
    """The executor ctx agentd builds (any object with these attributes will do)."""

    cgroup: CellCgroups
    net: CellNet
    spawner: Spawner
    paths: Paths
    dirs: CellDirs
    firewall: CellFirewall | None = None  # None: ApplyCellFirewall refuses (fail closed)


def same_path(path: str, expected: Path, what: str) -> Path:
    """The journaled ``path`` if it is the one the adapters would use now: the privileged
    side re-checks each planned path against its own roots (bubblewrap's habit)."""
    if Path(path) != expected:
        raise ConfigError("E_PATH", f"{what} {path!r} is not {str(expected)!r}",
                          "the plan was made for another state_dir/run_dir")
    return expected
