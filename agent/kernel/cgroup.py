"""TODO docstring."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from agent.core.cgroup import CellStats, Limits
from agent.core.errors import KernelError

__all__ = ["CellCgroupBackend", "CgroupBackend", "read_proc_cgroup"]


def read_proc_cgroup(pid: int, proc_root: Path = Path("/proc")) -> str | None:
    """``/proc/PID/cgroup`` (one small read), or None when the process is gone."""
    path = proc_root / str(pid) / "cgroup"
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        raise KernelError.from_oserror("read", str(path), exc) from exc


@runtime_checkable
class CgroupBackend(Protocol):
    """What the agent needs from a cgroup hierarchy, whatever its version."""

    root: Path

    def setup(self) -> frozenset[str]: ...
    def create(self, cell: str) -> Path: ...
    def set_limits(self, cell: str, limits: Limits) -> None: ...
    def stats(self, cell: str) -> CellStats: ...
    def procs(self, cell: str) -> list[int]: ...
    def add_proc(self, cell: str, pid: int) -> None: ...
    def kill(self, cell: str, timeout: float = 5.0) -> None: ...
    def freeze(self, cell: str, timeout: float = 5.0) -> None: ...
    def thaw(self, cell: str, timeout: float = 5.0) -> None: ...
    def remove(self, cell: str, timeout: float = 5.0) -> None: ...
    def list_cells(self) -> Sequence[str]: ...
    def pid_to_cell(self, pid: int, proc_root: Path = ...) -> str | None: ...


@runtime_checkable
class CellCgroupBackend(CgroupBackend, Protocol):
    """A backend that also tells a cell's leaf directory (what the spawner joins and
    ``agentctl inspect`` shows).  Kept apart from :class:`CgroupBackend` so a backend
    without it (cgroupv1 today) still satisfies that protocol."""

    def leaf(self, cell: str) -> Path: ...
