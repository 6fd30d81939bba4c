"""cgroup v2 (unified hierarchy) backend.

Layout (defaults)::

    /sys/fs/cgroup/                 mount point, the root cgroup
    ├── agent-master/               agentd itself (optional, see ``master``)
    └── agent/                      ``root``: the agent's subtree, no processes
        ├── <cell>/                 one leaf per cell
        └── ...

The "no internal processes" rule forbids a non-root cgroup with processes from
distributing controllers to children, so ``agent/`` never holds a process.
agentd lives outside it: by default where init put it; with
``master="agent-master"`` :meth:`CgroupV2.setup` creates that sibling and moves
the calling process there, which accounts the master's own CPU and memory
separately from the cells and lets a ``memory.min`` protect it.

Every path is derived from ``root`` (and ``mount``), so tests point the backend
at a fake cgroupfs in a temporary directory.  Files are written with a single
``write(2)`` without ``O_CREAT``: a missing file is an error, as on the kernel.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

from agent.core.cgroup import (
    CellStats,
    Limits,
    Pressure,
    cell_from_proc_cgroup,
    parse_flat_keyed,
    parse_pressure,
)
from agent.core.cgroupmode import V2_REQUIRED
from agent.core.errors import KernelError
from agent.core.names import check_cell_name
from agent.kernel.cgroup import read_proc_cgroup, sigkill_all, try_rmdir, wait_until

__all__ = ["OPTIONAL_CONTROLLERS", "REQUIRED_CONTROLLERS", "CgroupV2"]

REQUIRED_CONTROLLERS = V2_REQUIRED
# Without io the io.weight limit is skipped; cpuset is enabled for later pinning.
OPTIONAL_CONTROLLERS = ("io", "cpuset")


_WRITE_HINTS = {
    errno.ENOENT: "the file is missing: is the controller enabled in the parent's "
    "cgroup.subtree_control, and does the cgroup exist?",
    errno.EBUSY: "the cgroup has processes of its own (no internal processes rule) "
    "or children using the controller",
    errno.EINVAL: "the kernel rejected the value",
    errno.EACCES: "agentd must run as root or own a delegated subtree",
    errno.EPERM: "agentd must run as root or own a delegated subtree",
    errno.EOPNOTSUPP: "the kernel lacks this cgroup feature",
    errno.ESRCH: "the process no longer exists",
}


def _hint(err: int) -> str | None:
    return _WRITE_HINTS.get(err)


class CgroupV2:
    """The agent's subtree of a cgroup v2 hierarchy.

    ``kill_fn``, ``sleep`` and ``clock`` are injectable so that tests on a
    fake cgroupfs never signal real processes or wait in real time.
    """

    def __init__(
        self,
        root: Path = Path("/sys/fs/cgroup/agent"),
        *,
        mount: Path | None = None,
        master: str | None = None,
        kill_fn: Callable[[int, int], None] = os.kill,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = Path(root)
        self.mount = Path(mount) if mount is not None else self.root.parent
        rel = self.root.relative_to(self.mount)
        self.prefix = "/" + rel.as_posix() if rel.parts else "/"
        self.master = master
        self._kill = kill_fn
        self._sleep = sleep
        self._clock = clock
        self._controllers: frozenset[str] | None = None

    # -- file helpers ----------------------------------------------------------

    version = 2

    def leaf(self, cell: str) -> Path:
        return self.root / check_cell_name(cell)

    def cell_dir(self, cell: str, controller: str) -> Path:
        return self.leaf(cell)  # one hierarchy holds every controller

    def memory_pressure_fd(self, cell: str, level: str = "medium") -> int:
        raise KernelError("memory.pressure_level", str(self.leaf(cell)), errno.EOPNOTSUPP,
                          "cgroup v2 has PSI triggers on memory.pressure instead")

    def _write(self, path: Path, value: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        except OSError as exc:
            raise KernelError.from_oserror("write", str(path), exc, _hint(exc.errno or 0)) from exc
        try:
            os.write(fd, value.encode())
        except OSError as exc:
            raise KernelError.from_oserror(
                "write", f"{path} <- {value!r}", exc, _hint(exc.errno or 0)
            ) from exc
        finally:
            os.close(fd)

    def _read(self, path: Path) -> str:
        try:
            return path.read_text()
        except OSError as exc:
            raise KernelError.from_oserror("read", str(path), exc) from exc

    def _read_int(self, path: Path) -> int:
        text = self._read(path).strip()
        try:
            return int(text)
        except ValueError:
            raise KernelError("parse", str(path), errno.EINVAL, f"unexpected {text!r}") from None

    def _wait(self, cond: Callable[[], bool], timeout: float, op: str, target: Path,
              hint: str) -> None:
        wait_until(cond, self._clock() + timeout, self._clock, self._sleep, op, target, hint)

    def _events(self, cell: str) -> dict[str, int]:
        return parse_flat_keyed(self._read(self.leaf(cell) / "cgroup.events"))

    # -- setup -----------------------------------------------------------------

    def setup(self) -> frozenset[str]:
        """Create the subtree and enable controllers; returns those enabled."""
        parent = self.root.parent
        available = set(self._read(parent / "cgroup.controllers").split())
        missing = [c for c in REQUIRED_CONTROLLERS if c not in available]
        if missing:
            raise KernelError(
                "enable controllers", str(parent / "cgroup.controllers"), errno.EOPNOTSUPP,
                f"kernel lacks cgroup v2 controllers {', '.join(missing)}",
            )
        wanted = [c for c in REQUIRED_CONTROLLERS + OPTIONAL_CONTROLLERS if c in available]
        line = " ".join("+" + c for c in wanted)
        if self.master is not None:
            master = parent / self.master
            self._mkdir(master)
            self._write(master / "cgroup.procs", str(os.getpid()))
        self._write(parent / "cgroup.subtree_control", line)
        self._mkdir(self.root)
        if self._read(self.root / "cgroup.procs").split():
            raise KernelError(
                "setup", str(self.root), errno.EBUSY,
                "the agent's subtree must hold no processes: move them to a leaf",
            )
        self._write(self.root / "cgroup.subtree_control", line)
        self._controllers = frozenset(wanted)
        return self._controllers

    def controllers(self) -> frozenset[str]:
        """Controllers enabled for the cells (read once from the subtree)."""
        if self._controllers is None:
            text = self._read(self.root / "cgroup.subtree_control")
            self._controllers = frozenset(x.lstrip("+") for x in text.split())
        return self._controllers

    def _mkdir(self, path: Path) -> None:
        try:
            path.mkdir(exist_ok=True)
        except OSError as exc:
            raise KernelError.from_oserror("mkdir", str(path), exc, _hint(exc.errno or 0)) from exc

    # -- cells -----------------------------------------------------------------

    def create(self, cell: str) -> Path:
        """Create the cell's leaf (idempotent) and return its path."""
        path = self.leaf(cell)
        self._mkdir(path)
        return path

    def set_limits(self, cell: str, limits: Limits) -> None:
        """Write every limit; a file whose controller is not enabled is skipped
        only for the optional io controller (documented degradation)."""
        path = self.leaf(cell)
        enabled = self.controllers()
        for name, value in limits.files():
            if name.startswith("io.") and "io" not in enabled:
                continue
            self._write(path / name, value)

    def stats(self, cell: str) -> CellStats:
        path = self.leaf(cell)
        cpu = parse_flat_keyed(self._read(path / "cpu.stat"))
        pressure: dict[str, Pressure] = {}
        for res in ("cpu", "memory", "io"):
            try:
                text = (path / f"{res}.pressure").read_text()
            except OSError:  # PSI off (psi=0, CONFIG_PSI=n) or controller absent
                continue
            try:
                pressure[res] = parse_pressure(text)
            except ValueError as exc:
                raise KernelError(
                    "parse", str(path / f"{res}.pressure"), errno.EINVAL, str(exc)
                ) from None
        return CellStats(
            cpu_usage_usec=cpu.get("usage_usec", 0),
            memory_current=self._read_int(path / "memory.current"),
            memory_events=parse_flat_keyed(self._read(path / "memory.events")),
            pids_current=self._read_int(path / "pids.current"),
            pressure=pressure,
        )

    def procs(self, cell: str) -> list[int]:
        text = self._read(self.leaf(cell) / "cgroup.procs")
        return [int(x) for x in text.split()]

    def add_proc(self, cell: str, pid: int) -> None:
        self._write(self.leaf(cell) / "cgroup.procs", str(pid))

    def kill(self, cell: str, timeout: float = 5.0) -> None:
        """Kill every process of the cell and wait until none is left.

        Uses ``cgroup.kill`` (Linux 5.14+).  Without it the cell is frozen
        (so nothing can fork meanwhile), every pid gets SIGKILL until
        ``cgroup.procs`` is empty, and it is thawed.  A missing cell is fine.
        """
        path = self.leaf(cell)
        if not path.is_dir():
            return
        hint = "a process did not die: stuck in uninterruptible sleep (D state)?"
        if (path / "cgroup.kill").exists():
            self._write(path / "cgroup.kill", "1")
            self._wait(lambda: not self.procs(cell), timeout, "kill", path, hint)
            return
        frozen = (path / "cgroup.freeze").exists()
        if frozen:
            self._write(path / "cgroup.freeze", "1")

        def sweep() -> bool:
            return sigkill_all(self.procs(cell), self._kill, str(path))

        try:
            self._wait(sweep, timeout, "kill", path, hint)
        finally:
            if frozen:
                self._write(path / "cgroup.freeze", "0")

    def freeze(self, cell: str, timeout: float = 5.0) -> None:
        path = self.leaf(cell)
        self._write(path / "cgroup.freeze", "1")
        self._wait(lambda: self._events(cell).get("frozen") == 1, timeout, "freeze", path,
                   "a process did not stop: stuck in the kernel?")

    def thaw(self, cell: str, timeout: float = 5.0) -> None:
        path = self.leaf(cell)
        self._write(path / "cgroup.freeze", "0")
        self._wait(lambda: self._events(cell).get("frozen") == 0, timeout, "thaw", path,
                   "the cgroup stays frozen: is a parent frozen?")

    def remove(self, cell: str, timeout: float = 5.0) -> None:
        """rmdir the leaf, retrying while dying processes drain (EBUSY).
        A missing leaf is fine, so undo and orphan collection can repeat it."""
        path = self.leaf(cell)
        self._wait(lambda: try_rmdir(path, _WRITE_HINTS), timeout, "rmdir", path,
                   "processes are still in the cgroup: kill the cell first")

    def list_cells(self) -> list[str]:
        """Leaves under the subtree (for orphan detection), sorted."""
        try:
            entries = list(self.root.iterdir())
        except OSError as exc:
            raise KernelError.from_oserror("list", str(self.root), exc) from exc
        out = []
        for p in entries:
            if p.is_dir():
                try:
                    check_cell_name(p.name)
                except Exception:
                    continue
                out.append(p.name)
        return sorted(out)

    def pid_to_cell(self, pid: int, proc_root: Path = Path("/proc")) -> str | None:
        """The cell a pid belongs to (one small read), or None (not a cell, gone)."""
        text = read_proc_cgroup(pid, proc_root)
        return None if text is None else cell_from_proc_cgroup(text, self.prefix)
