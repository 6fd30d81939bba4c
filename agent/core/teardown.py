"""The operations that destroy a cell (the destroy half of a plan).

Destroy steps (``Kill*``/``Remove*``/``Release*``) have a no-op undo: putting back what a
failed destroy already removed would resurrect half a cell.  Every destroy step is
idempotent instead, so a failed destroy plan is simply run again (the lifecycle's
FAILED -> STOP_REQUESTED -> DESTROYING) or its leftovers are collected by the reclaim
loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from agent.core.cellctx import CellContext, same_path
from agent.core.names import NETNS_PREFIX, veth_names
from agent.core.plan import DataOp, register_op

__all__ = ["KillCell", "ReleaseDirs", "RemoveCgroup", "RemoveGateway", "RemoveLink",
           "RemoveNetns", "UnmountData"]


class _DestroyStep(DataOp):
    cell: str

    def undo(self, ctx: CellContext, undo_data: Mapping[str, Any]) -> None:
        return None


@register_op
@dataclass(frozen=True)
class KillCell(_DestroyStep):
    kind: ClassVar[str] = "kill-cell"
    cell: str

    def describe(self) -> str:
        return f"kill every process of {self.cell} (cgroup.kill) and reap pid 1"

    def apply(self, ctx: CellContext) -> Mapping[str, Any]:
        ctx.spawner.stop(self.cell, None)
        ctx.cgroup.kill(self.cell)
        return {}


@register_op
@dataclass(frozen=True)
class RemoveLink(_DestroyStep):
    kind: ClassVar[str] = "remove-link"
    cell: str

    def describe(self) -> str:
        return f"delete veth {veth_names(self.cell)[0]} of {self.cell} (and its VLAN entry)"

    def apply(self, ctx: CellContext) -> Mapping[str, Any]:
        ctx.net.destroy_link(self.cell)
        return {}


@register_op
@dataclass(frozen=True)
class RemoveNetns(_DestroyStep):
    kind: ClassVar[str] = "remove-netns"
    cell: str

    def describe(self) -> str:
        return f"remove network namespace {NETNS_PREFIX}{self.cell}"

    def apply(self, ctx: CellContext) -> Mapping[str, Any]:
        ctx.net.destroy_netns(self.cell)
        return {}


@register_op
@dataclass(frozen=True)
class RemoveCgroup(_DestroyStep):
    kind: ClassVar[str] = "remove-cgroup"
    cell: str

    def describe(self) -> str:
        return f"remove cgroup {self.cell}"

    def apply(self, ctx: CellContext) -> Mapping[str, Any]:
        ctx.cgroup.kill(self.cell)
        ctx.cgroup.remove(self.cell)
        return {}


@register_op
@dataclass(frozen=True)
class UnmountData(_DestroyStep):
    """The cell's data mount goes (lazily: nothing of the cell runs any more); the image
    stays, with the data, for the service's next cell."""

    kind: ClassVar[str] = "unmount-data"
    cell: str
    mount: str

    def describe(self) -> str:
        return f"unmount data dir {self.mount} (the image and its data are kept)"

    def apply(self, ctx: CellContext) -> Mapping[str, Any]:
        ctx.dirs.unmount_data(same_path(self.mount, ctx.paths.data_mount(self.cell),
                                        "data mount"))
        return {}


@register_op
@dataclass(frozen=True)
class ReleaseDirs(_DestroyStep):
    kind: ClassVar[str] = "release-dirs"
    cell: str
    run_dir: str

    def describe(self) -> str:
        return f"remove run dir {self.run_dir} (persistent data is kept)"

    def apply(self, ctx: CellContext) -> Mapping[str, Any]:
        ctx.dirs.remove_run_dir(same_path(self.run_dir, ctx.paths.cell_run_dir(self.cell),
                                      "run dir"))
        return {}


@register_op
@dataclass(frozen=True)
class RemoveGateway(_DestroyStep):
    """The VLAN's gateway, planned when the cell was the VLAN's last."""

    kind: ClassVar[str] = "remove-gateway"
    cell: str
    vlan: int

    def describe(self) -> str:
        return f"remove the gateway of VLAN {self.vlan} (no cell left on it)"

    def apply(self, ctx: CellContext) -> Mapping[str, Any]:
        ctx.net.remove_gateway(self.vlan)
        return {}
