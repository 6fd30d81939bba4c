"""What a cell plan's operations need from the executor's context (the adapters).

Each protocol here is the narrow view one kind of op has of an adapter: the cgroup
backend, the host network, the spawner, the cell's directories, the firewall.  agentd
passes the real adapters (:class:`Context`); tests pass recording fakes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.core.cgroup import Limits
from agent.core.errors import ConfigError
from agent.core.names import check_cell_name
from agent.core.sandbox import SpawnSpec

__all__ = ["CellCgroups", "CellContext", "CellDirs", "CellFirewall", "CellNet", "Context",
           "Paths", "Spawner", "same_path"]



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

    def data_dir(self, source: str) -> Path:
        if not source or "/" in source or source.startswith("."):
            raise ConfigError("E_PATH", f"data source {source!r} is not a plain name")
        return self.state_dir / "data" / source


class CellFirewall(Protocol):
    """agent.kernel.nft.FirewallSync: nft batches applied in a cell's netns."""

    def apply_cell(self, cell: str, batch: Sequence[dict[str, Any]]) -> None: ...
    def remove_cell(self, cell: str) -> None: ...


class CellDirs(Protocol):
    """agent.kernel.dirs.CellDirs: the cell's run dir and data dir on the host."""

    def make_run_dir(self, run: Path, hosts: str) -> None: ...
    def discard_run_dir(self, run: Path) -> None: ...
    def remove_run_dir(self, run: Path) -> None: ...
    def make_data_dir(self, data: Path, uid: int, gid: int) -> bool: ...
    def remove_data_dir_if_empty(self, data: Path) -> None: ...


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
