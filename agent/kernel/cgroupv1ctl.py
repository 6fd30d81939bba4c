"""cgroupspy's v1 controllers, extended for what it lacks (pids, freezer), and the hints
the v1 backend (:mod:`agent.kernel.cgroupv1`) attaches to a failed cgroupfs call by errno.
"""

from __future__ import annotations

import errno
from typing import Any

from cgroupspy.controllers import (
    BlkIOController,
    Controller,
    CpuAcctController,
    CpuController,
    MemoryController,
)
from cgroupspy.interfaces import BaseFileInterface, IntegerFile

__all__ = ["CONTROLLER_CLASSES", "HINTS"]


class _MaxIntFile(BaseFileInterface):  # type: ignore[misc]
    """``max`` or an integer (``pids.max``)."""

    def sanitize_get(self, value: str) -> int | None:
        return None if value == "max" else int(value)


class _PidsController(Controller):  # type: ignore[misc]
    max = _MaxIntFile("pids.max")
    current = IntegerFile("pids.current")


class _FreezerController(Controller):  # type: ignore[misc]
    state = BaseFileInterface("freezer.state")


CONTROLLER_CLASSES: dict[str, Any] = {
    "cpu": CpuController,
    "cpuacct": CpuAcctController,
    "memory": MemoryController,
    "pids": _PidsController,
    "blkio": BlkIOController,
    "freezer": _FreezerController,
}


HINTS = {
    errno.ENOENT: "the file is missing: does the cgroup exist, and does the kernel have this "
    "v1 feature (CONFIG_CFS_BANDWIDTH, CONFIG_MEMCG_SWAP)?",
    errno.EBUSY: "v1 refuses a memory limit below what the cell uses and cannot reclaim "
    "(it does not OOM-kill); the old limit stays",
    errno.EINVAL: "the kernel rejected the value (cpu quota under 1 ms or above the parent's?)",
    errno.ENOSPC: "cpuset.cpus or cpuset.mems of the cgroup is empty",
    errno.EACCES: "agentd must run as root",
    errno.EPERM: "agentd must run as root",
    errno.ESRCH: "the process no longer exists",
}
