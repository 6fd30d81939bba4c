"""The one protocol of the cgroup backends, and the /proc read that attributes a pid."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from agent.core.cgroup import CellStats, Limits
from agent.core.errors import KernelError

__all__ = ["CgroupBackend", "read_proc_cgroup", "sigkill_all", "try_rmdir", "wait_until"]


def read_proc_cgroup(pid: int, proc_root: Path = Path("/proc")) -> str | None:
    """``/proc/PID/cgroup`` (one small read), or None when the process is gone."""
    path = proc_root / str(pid) / "cgroup"
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        raise KernelError.from_oserror("read", str(path), exc) from exc


def try_rmdir(path: Path, hints: Mapping[int, str]) -> bool:
    """One attempt to remove a cell's cgroup directory: True when it is gone (or was
    never there), False while dying processes still hold it (EBUSY: try again)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise KernelError.from_oserror(
            "rmdir", str(path), exc,
            "the cell's cgroup has child cgroups" if exc.errno == errno.ENOTEMPTY
            else hints.get(exc.errno or 0),
        ) from exc
    return True


def wait_until(cond: Callable[[], bool], deadline: float, clock: Callable[[], float],
               sleep: Callable[[float], None], op: str, target: Path, hint: str) -> None:
    """Poll ``cond`` (2 ms, doubling to 50 ms) until it holds; past ``deadline`` a
    KernelError(op, target, ETIMEDOUT, hint).  For what the kernel does asynchronously
    (dying processes leaving a cgroup, a freezer settling)."""
    delay = 0.002
    while not cond():
        if clock() >= deadline:
            raise KernelError(op, str(target), errno.ETIMEDOUT, hint)
        sleep(delay)
        delay = min(delay * 2, 0.05)


def sigkill_all(pids: Sequence[int], kill: Callable[[int, int], None], where: str) -> bool:
    """One sweep of a cell without ``cgroup.kill``: SIGKILL each of ``pids`` (one already
    gone is fine); True when there was nothing left to kill."""
    for pid in pids:
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except OSError as exc:
            raise KernelError.from_oserror("kill", f"pid {pid} of {where}", exc) from exc
    return not pids


@runtime_checkable
class CgroupBackend(Protocol):
    """What the agent needs from a cgroup hierarchy, whatever its version: both
    :class:`agent.kernel.cgroupv2.CgroupV2` and :class:`agent.kernel.cgroupv1.CgroupV1`
    implement all of it (v1 degrades where it lacks a feature, docs/cgroup-v1.md)."""

    root: Path
    version: int  # 2 (unified hierarchy) or 1 (legacy hierarchies)

    def setup(self) -> frozenset[str]: ...
    def create(self, cell: str) -> Path: ...
    def leaf(self, cell: str) -> Path:
        """The cell's directory (v1: in the memory hierarchy)."""
        ...
    def cell_dir(self, cell: str, controller: str) -> Path:
        """The cell's directory in ``controller``'s hierarchy (v2: the leaf)."""
        ...
    def set_limits(self, cell: str, limits: Limits) -> None: ...
    def stats(self, cell: str) -> CellStats: ...
    def procs(self, cell: str) -> list[int]: ...
    def add_proc(self, cell: str, pid: int) -> None: ...
    def memory_pressure_fd(self, cell: str, level: str = "medium") -> int:
        """v1's memory.pressure_level eventfd; v2 raises KernelError (it has PSI)."""
        ...
    def kill(self, cell: str, timeout: float = 5.0) -> None: ...
    def freeze(self, cell: str, timeout: float = 5.0) -> None: ...
    def thaw(self, cell: str, timeout: float = 5.0) -> None: ...
    def remove(self, cell: str, timeout: float = 5.0) -> None: ...
    def list_cells(self) -> Sequence[str]: ...
    def pid_to_cell(self, pid: int, proc_root: Path = ...) -> str | None: ...
