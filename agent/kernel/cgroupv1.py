"""cgroup v1 (legacy hierarchies) backend, for BSP kernels without cgroup v2.

Layout (defaults)::

    /sys/fs/cgroup/<controller>/    one mounted hierarchy per controller
    └── agent/                      ``name``: the agent's subtree in each one
        └── <cell>/                 one directory per cell, in every hierarchy

The controllers used are cpu, cpuacct, memory and pids (required) and blkio
and freezer (optional).  Co-mounted hierarchies (``cpu,cpuacct``) are handled
by passing the same path for both in ``hierarchies``.  ``root`` is the
memory hierarchy's subtree, the one that decides the cell of a pid.

cgroupspy supplies the typed reads (its ``Controller`` classes, extended for pids and
freezer, which it lacks, in :mod:`agent.kernel.cgroupv1ctl`) and the ``Node`` tree used to create
directories.  Writes are plain ``open(2)`` without ``O_CREAT`` and a single
``write(2)``: cgroupspy opens files with ``"w"`` (which would create missing
files on a fake tree) and reports errors at close without the path.

Where v1 lacks a v2 feature the backend degrades in a stated way, listed in
:attr:`CgroupV1.features` and :func:`degraded_limits`; see docs/cgroup-v1.md.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from cgroupspy.nodes import Node

from agent.core.cgroup import CellStats, Limits
from agent.core.cgroupv1map import (
    cell_from_proc_cgroup_v1,
    v1_files,
)
from agent.core.errors import ConfigError, KernelError
from agent.core.names import check_cell_name
from agent.kernel.cgroup import read_proc_cgroup, sigkill_all, try_rmdir, wait_until
from agent.kernel.cgroupv1ctl import CONTROLLER_CLASSES, HINTS

__all__ = [
    "CONTROLLERS",
    "OPTIONAL_CONTROLLERS",
    "REQUIRED_CONTROLLERS",
    "CgroupV1",
]

REQUIRED_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")
OPTIONAL_CONTROLLERS = ("blkio", "freezer")
CONTROLLERS = REQUIRED_CONTROLLERS + OPTIONAL_CONTROLLERS


class CgroupV1:
    """The agent's subtree in every v1 hierarchy.

    ``hierarchies`` maps a controller to its mount point (default
    ``mount_root/<controller>``); :func:`agent.kernel.cgroupdetect.open_backend`
    fills it from /proc/self/mounts.  ``kill_fn``, ``sleep`` and ``clock`` are
    injectable so tests on a fake tree never signal or wait for real.
    """

    def __init__(
        self,
        mount_root: Path = Path("/sys/fs/cgroup"),
        name: str = "agent",
        *,
        hierarchies: Mapping[str, Path] | None = None,
        kill_fn: Callable[[int, int], None] = os.kill,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for part in name.split("/"):
            check_cell_name(part)
        self.mount_root = Path(mount_root)
        self.name = name
        self.prefix = "/" + name
        if hierarchies is None:
            hierarchies = {c: self.mount_root / c for c in CONTROLLERS}
        self.hierarchies = {c: Path(p) for c, p in hierarchies.items() if c in CONTROLLERS}
        self.root = self.hierarchies.get("memory", self.mount_root / "memory") / name
        self.recorded: dict[str, Limits] = {}
        self._kill = kill_fn
        self._sleep = sleep
        self._clock = clock
        self._present: frozenset[str] | None = None
        self._features: frozenset[str] | None = None
        self._io_file: str | None = None

    # -- paths and file helpers ------------------------------------------------------

    def subtree(self, controller: str) -> Path:
        return self.hierarchies[controller] / self.name

    version = 1

    def cell_dir(self, cell: str, controller: str) -> Path:
        return self.subtree(controller) / check_cell_name(cell)

    def leaf(self, cell: str) -> Path:
        """The cell's directory in the memory hierarchy (the ``root`` one)."""
        return self.cell_dir(cell, "memory")

    def controllers(self) -> frozenset[str]:
        """Controllers whose hierarchy is mounted (probed once)."""
        if self._present is None:
            self._present = frozenset(c for c, p in self.hierarchies.items() if p.is_dir())
        return self._present

    def dirs(self, cell: str) -> list[Path]:
        """The cell's directories, one per distinct hierarchy, in CONTROLLERS order."""
        out: list[Path] = []
        for c in CONTROLLERS:
            if c in self.controllers() and self.cell_dir(cell, c) not in out:
                out.append(self.cell_dir(cell, c))
        return out

    def _write(self, path: Path, value: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        except OSError as exc:
            raise KernelError.from_oserror("write", str(path), exc,
                                           HINTS.get(exc.errno or 0)) from exc
        try:
            os.write(fd, value.encode())
        except OSError as exc:
            raise KernelError.from_oserror("write", f"{path} <- {value!r}", exc,
                                           HINTS.get(exc.errno or 0)) from exc
        finally:
            os.close(fd)

    def _ctrl(self, cell: str, controller: str) -> Any:
        return CONTROLLER_CLASSES[controller](Node(os.fsencode(self.cell_dir(cell, controller))))

    def _get(self, ctrl: Any, attr: str) -> Any:
        """Read a typed cgroupspy attribute; errors name the file."""
        path = os.fsdecode(ctrl.filepath(ctrl.get_interface(attr).filename))
        try:
            return getattr(ctrl, attr)
        except OSError as exc:
            raise KernelError.from_oserror("read", path, exc) from exc
        except (ValueError, KeyError):
            raise KernelError("parse", path, errno.EINVAL, "unexpected contents") from None

    def _get_int(self, ctrl: Any, attr: str) -> int:
        value = self._get(ctrl, attr)
        if not isinstance(value, int):
            path = os.fsdecode(ctrl.filepath(ctrl.get_interface(attr).filename))
            raise KernelError("parse", path, errno.EINVAL, f"expected a number, got {value!r}")
        return value

    def _mkdir(self, parent: Path, child: str) -> Path:
        try:
            Node(os.fsencode(parent)).create_cgroup(child)
        except OSError as exc:
            raise KernelError.from_oserror("mkdir", str(parent / child), exc,
                                           HINTS.get(exc.errno or 0)) from exc
        self._inherit_cpuset(parent / child)
        return parent / child

    def _inherit_cpuset(self, path: Path) -> None:
        """A hierarchy co-mounted with cpuset needs cpus/mems before a task can join."""
        for name in ("cpuset.cpus", "cpuset.mems"):
            f = path / name
            if f.exists() and not f.read_text().strip():
                self._write(f, (path.parent / name).read_text().strip())

    def _wait(self, cond: Callable[[], bool], deadline: float, op: str, target: Path,
              hint: str) -> None:
        wait_until(cond, deadline, self._clock, self._sleep, op, target, hint)

    # -- setup and capabilities --------------------------------------------------------

    def setup(self) -> frozenset[str]:
        """Create the subtree in every hierarchy; returns the controllers in use."""
        self._present = None
        present = self.controllers()
        missing = [c for c in REQUIRED_CONTROLLERS if c not in present]
        if missing:
            raise KernelError(
                "setup", str(self.mount_root), errno.EOPNOTSUPP,
                f"no cgroup v1 hierarchy for {', '.join(missing)}: mount it "
                f"(mount -t cgroup -o {missing[0]} cgroup {self.mount_root / missing[0]})",
            )
        for c in CONTROLLERS:
            if c in present:
                parent = self.hierarchies[c]
                for part in self.name.split("/"):
                    parent = self._mkdir(parent, part)
        mem = self.subtree("memory") / "memory.use_hierarchy"
        if mem.exists() and mem.read_text().strip() == "0":
            # Old kernels default to flat accounting.  Best effort: per-cell limits do
            # not depend on it, and the kernel refuses it once children exist.
            try:
                self._write(mem, "1")
            except KernelError:
                pass
        self._features = None
        return present

    @property
    def features(self) -> frozenset[str]:
        """Capabilities (names from ALL_FEATURES) this kernel gives cells on v1,
        probed in the subtree (complete once setup() has created it).

        Never "psi", "memory.high", "memory.min", "cgroup.kill" or
        "memory.reclaim": v1 has no such files.
        """
        if self._features is None:
            feats = set()
            if "freezer" in self.controllers():
                feats.add("freeze")
            self._io_file = None
            if "blkio" in self.controllers():
                for f in ("blkio.weight", "blkio.bfq.weight"):
                    if (self.subtree("blkio") / f).exists():
                        self._io_file = f
                        feats.add("io.weight")
                        break
            if not self.root.is_dir():  # before setup(): probe again later
                return frozenset(feats)
            self._features = frozenset(feats)
        return self._features

    # -- cells -----------------------------------------------------------------------------

    def create(self, cell: str) -> Path:
        """Create the cell in every hierarchy (idempotent); returns its memory directory."""
        check_cell_name(cell)
        for d in self.dirs(cell):
            self._mkdir(d.parent, cell)
        return self.root / cell

    def set_limits(self, cell: str, limits: Limits) -> None:
        """Write the v1 files (:func:`v1_files`); record what v1 cannot enforce."""
        _ = self.features  # probes the io weight file
        memsw = (self.cell_dir(cell, "memory") / "memory.memsw.limit_in_bytes").exists()
        for ctrl, name, value in v1_files(limits, io_file=self._io_file, memsw=memsw):
            if ctrl in self.controllers():
                self._write(self.cell_dir(cell, ctrl) / name, value)
        self.recorded[cell] = limits

    def stats(self, cell: str) -> CellStats:
        """Usage from cpuacct/memory/pids.  ``memory_events`` has ``max``
        (memory.failcnt) and ``oom_kill`` (where the kernel counts it); no
        pressure: v1 has no per-cgroup PSI."""
        mem = self._ctrl(cell, "memory")
        events = {"max": self._get_int(mem, "failcnt")}
        oom = self._get(mem, "oom_control")
        if isinstance(oom, dict) and "oom_kill" in oom:
            events["oom_kill"] = oom["oom_kill"]
        return CellStats(
            cpu_usage_usec=self._get_int(self._ctrl(cell, "cpuacct"), "usage") // 1000,
            memory_current=self._get_int(mem, "usage_in_bytes"),
            memory_events=events,
            pids_current=self._get_int(self._ctrl(cell, "pids"), "current"),
            pressure={},
        )

    def procs(self, cell: str) -> list[int]:
        """Processes in the cell in any hierarchy (sorted, no duplicates).

        A hierarchy where the cell is missing (half-created) is skipped; a
        cell missing everywhere is an error."""
        pids: set[int] = set()
        found = False
        for c in CONTROLLERS:
            if c in self.controllers():
                try:
                    pids.update(self._get(self._ctrl(cell, c), "procs"))
                except KernelError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    continue
                found = True
        if not found:
            raise KernelError("read", str(self.root / cell), errno.ENOENT, "no such cell")
        return sorted(pids)

    def add_proc(self, cell: str, pid: int) -> None:
        """Move the process (all its threads) into the cell in every hierarchy."""
        for d in self.dirs(cell):
            self._write(d / "cgroup.procs", str(pid))

    def memory_pressure_fd(self, cell: str, level: str = "medium") -> int:
        """An eventfd that becomes readable when the cell's memcg reclaims at
        ``level`` (low, medium, critical) or worse: v1's ``memory.pressure_level``
        notification, the nearest thing to a PSI trigger, so the tuner can wait
        instead of sampling.  The caller owns the fd; the kernel drops the
        registration when it is closed or the cell removed."""
        if level not in ("low", "medium", "critical"):
            raise ConfigError("E_LIMITS", f"memory pressure level {level!r} is not valid",
                              "use low, medium or critical")
        d = self.cell_dir(cell, "memory")
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            try:
                pfd = os.open(d / "memory.pressure_level", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise KernelError.from_oserror("open", str(d / "memory.pressure_level"), exc,
                                               "kernel without memory.pressure_level") from exc
            try:
                self._write(d / "cgroup.event_control", f"{efd} {pfd} {level}")
            finally:
                os.close(pfd)
        except BaseException:
            os.close(efd)
            raise
        return efd

    def _freezer_state(self, cell: str) -> str:
        return str(self._get(self._ctrl(cell, "freezer"), "state"))

    def _set_freezer(self, cell: str, state: str, deadline: float) -> None:
        if "freeze" not in self.features:
            raise KernelError("freeze" if state == "FROZEN" else "thaw", str(self.mount_root),
                              errno.EOPNOTSUPP, "no freezer hierarchy on this kernel")
        path = self.cell_dir(cell, "freezer")
        self._write(path / "freezer.state", state)
        self._wait(lambda: self._freezer_state(cell) == state, deadline,
                   "freeze" if state == "FROZEN" else "thaw", path,
                   "a process did not stop: stuck in the kernel (D state)?"
                   if state == "FROZEN" else "a parent cgroup is frozen")

    def freeze(self, cell: str, timeout: float = 5.0) -> None:
        """FROZEN and wait; on timeout the freeze is cancelled (THAWED) and raised."""
        try:
            self._set_freezer(cell, "FROZEN", self._clock() + timeout)
        except KernelError as exc:
            if exc.errno == errno.ETIMEDOUT:
                self._write(self.cell_dir(cell, "freezer") / "freezer.state", "THAWED")
            raise

    def thaw(self, cell: str, timeout: float = 5.0) -> None:
        self._set_freezer(cell, "THAWED", self._clock() + timeout)

    def kill(self, cell: str, timeout: float = 5.0) -> None:
        """Freeze (no forks meanwhile), SIGKILL every process, thaw, wait until empty.

        v1 has no cgroup.kill.  Without a freezer, SIGKILL sweeps repeat until
        the cell is empty.  A missing cell is fine.
        """
        if not any(d.is_dir() for d in self.dirs(cell)):
            return
        deadline = self._clock() + timeout
        hint = "a process did not die: stuck in uninterruptible sleep (D state)?"

        def sweep() -> bool:
            return sigkill_all(self.procs(cell), self._kill, f"cell {cell}")

        frozen = "freeze" in self.features and self.cell_dir(cell, "freezer").is_dir()
        if frozen:
            try:
                self._write(self.cell_dir(cell, "freezer") / "freezer.state", "FROZEN")
                self._wait(lambda: self._freezer_state(cell) == "FROZEN", deadline, "kill",
                           self.cell_dir(cell, "freezer"), hint)
            except KernelError as exc:
                if exc.errno != errno.ETIMEDOUT:
                    raise
                # still FREEZING: kill what we can see, the sweep below repeats
            try:
                sweep()
            finally:
                self._write(self.cell_dir(cell, "freezer") / "freezer.state", "THAWED")
        self._wait(sweep, deadline, "kill", self.root / cell, hint)

    def remove(self, cell: str, timeout: float = 5.0) -> None:
        """rmdir the cell in every hierarchy, retrying while dying processes drain.

        ``memory.force_empty`` first reclaims the page cache charged to the
        cell, so it does not linger as a dead memcg.  A missing directory is fine.
        """
        deadline = self._clock() + timeout
        force = self.cell_dir(cell, "memory") / "memory.force_empty"
        if force.exists() and not self._get(self._ctrl(cell, "memory"), "procs"):
            try:
                self._write(force, "0")
            except KernelError as exc:  # harmless: rmdir reparents what is left
                if exc.errno not in (errno.EBUSY, errno.EINTR, errno.ENOENT, errno.EINVAL):
                    raise
        errors: list[KernelError] = []
        for d in self.dirs(cell):
            try:
                self._wait(partial(self._rmdir, d), deadline, "rmdir", d,
                           "processes are still in the cgroup: kill the cell first")
            except KernelError as exc:
                errors.append(exc)
        self.recorded.pop(cell, None)
        if errors:
            raise errors[0]

    @staticmethod
    def _rmdir(path: Path) -> bool:
        return try_rmdir(path, HINTS)

    def list_cells(self) -> list[str]:
        """Cells present in any hierarchy (so half-created ones are collected), sorted."""
        cells: set[str] = set()
        seen = False
        for c in CONTROLLERS:
            if c not in self.controllers():
                continue
            try:
                entries = list(self.subtree(c).iterdir())
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise KernelError.from_oserror("list", str(self.subtree(c)), exc) from exc
            seen = True
            for p in entries:
                if p.is_dir():
                    try:
                        cells.add(check_cell_name(p.name))
                    except Exception:
                        continue
        if not seen:
            raise KernelError("list", str(self.root), errno.ENOENT, "run setup() first")
        return sorted(cells)

    def pid_to_cell(self, pid: int, proc_root: Path = Path("/proc")) -> str | None:
        """The cell a pid belongs to, from its memory hierarchy line, or None."""
        text = read_proc_cgroup(pid, proc_root)
        return None if text is None else cell_from_proc_cgroup_v1(text, self.prefix)
