"""What the host offers and what its processes do, read from /proc (thin adapter).

:func:`read_capacity` and :func:`read_host_pressure` feed admission
(:mod:`agent.core.budget` decides); :func:`sigterm_caught` tells the cell manager whether
a cell's pid 1 handles SIGTERM.  Every reader takes its root as a parameter."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from typing import TypeVar

from agent.core.budget import Amount, HostPressure, parse_cpu_list, parse_meminfo_total
from agent.core.cgroup import Pressure, parse_pressure
from agent.core.errors import KernelError

__all__ = ["read_capacity", "read_host_pressure", "sigterm_caught"]

T = TypeVar("T")


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError as e:
        raise KernelError.from_oserror("read", path, e) from None


def _parsed(path: str, text: str, parse: Callable[[str], T]) -> T:
    try:
        return parse(text)
    except ValueError as e:
        raise KernelError("parse", path, errno.EINVAL, str(e)) from None


def read_capacity(proc_root: str = "/proc", sys_root: str | None = None) -> Amount:
    """Host capacity.  CPUs: ``sys_root``'s ``devices/system/cpu/online`` when given,
    else this process's affinity mask; pids: the lower of ``pid_max`` and ``threads-max``."""
    mi = os.path.join(proc_root, "meminfo")
    memory = _parsed(mi, _read(mi), parse_meminfo_total)
    if sys_root is not None:
        on = os.path.join(sys_root, "devices/system/cpu/online")
        cpus = _parsed(on, _read(on), parse_cpu_list)
    else:
        cpus = len(os.sched_getaffinity(0))
    pids = []
    for name in ("sys/kernel/pid_max", "sys/kernel/threads-max"):
        p = os.path.join(proc_root, name)
        pids.append(_parsed(p, _read(p), lambda t: int(t.strip())))
    return Amount(cpus * 1000, memory, min(pids))


def read_host_pressure(proc_root: str = "/proc") -> HostPressure:
    """Host PSI; a resource is ``None`` when the kernel lacks PSI (absent or psi=0)."""
    out: dict[str, Pressure | None] = {}
    for res in ("cpu", "memory", "io"):
        path = os.path.join(proc_root, "pressure", res)
        try:
            text = _read(path)
        except KernelError as e:
            if e.errno in (errno.ENOENT, errno.EOPNOTSUPP):
                out[res] = None
                continue
            raise
        out[res] = _parsed(path, text, parse_pressure)
    return HostPressure(out["cpu"], out["memory"], out["io"])


def sigterm_caught(pid: int, proc_root: str = "/proc") -> bool:
    """Does ``pid`` handle SIGTERM (SigCgt in /proc/PID/status)?  Unknown: True."""
    try:
        with open(os.path.join(proc_root, str(pid), "status")) as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except (OSError, ValueError, IndexError):
        pass
    return True
