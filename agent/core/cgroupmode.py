"""Which cgroup layout the box has (v2, v1, hybrid or none) from the text of
``/proc/filesystems`` and ``/proc/self/mounts``: the one answer status, diag and
checkconfig give (the reading is done by :mod:`agent.kernel.cgroupdetect`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "V1_CONTROLLERS",
    "V2_REQUIRED",
    "CgroupMount",
    "Layout",
    "classify",
    "parse_filesystems",
    "parse_mounts",
]

# The controllers the cgroup v2 backend cannot work without (agent.kernel.cgroupv2).
V2_REQUIRED = ("cpu", "memory", "pids")

# Names a v1 mount's options can carry that are controllers (the rest are flags).
V1_CONTROLLERS = frozenset({
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "net_prio",
    "blkio", "perf_event", "hugetlb", "pids", "rdma", "misc", "debug",
})


@dataclass(frozen=True)
class CgroupMount:
    fstype: str  # "cgroup" (v1) or "cgroup2"
    path: Path
    options: frozenset[str]

    @property
    def controllers(self) -> frozenset[str]:
        """v1 controllers bound to this hierarchy (empty for cgroup2 and named ones)."""
        return self.options & V1_CONTROLLERS if self.fstype == "cgroup" else frozenset()


@dataclass(frozen=True)
class Layout:
    kind: Literal["v2", "v1", "none"]
    reason: str
    unified: Path | None = None
    unified_controllers: frozenset[str] = frozenset()
    hierarchies: Mapping[str, Path] = field(default_factory=dict)
    filesystems: frozenset[str] = frozenset()


def _unescape(field_: str) -> str:
    """Undo the octal escapes of /proc/self/mounts (``\\040`` is a space)."""
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and len(field_) >= i + 4 and field_[i + 1:i + 4].isdigit():
            out.append(chr(int(field_[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def parse_mounts(text: str) -> list[CgroupMount]:
    """The cgroup and cgroup2 mounts of a ``/proc/self/mounts`` text, in order."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
            out.append(CgroupMount(parts[2], Path(_unescape(parts[1])),
                                   frozenset(parts[3].split(","))))
    return out


def parse_filesystems(text: str) -> frozenset[str]:
    """The cgroup filesystem types the kernel supports, from ``/proc/filesystems``."""
    names = {line.split()[-1] for line in text.splitlines() if line.split()}
    return frozenset(names & {"cgroup", "cgroup2"})


def classify(mounts: list[CgroupMount], filesystems: frozenset[str],
             controllers_of: Callable[[Path], frozenset[str]]) -> Layout:
    """Decide the layout; ``controllers_of`` reads a cgroup2 mount's cgroup.controllers."""
    hierarchies: dict[str, Path] = {}
    for m in mounts:
        for c in sorted(m.controllers):
            hierarchies.setdefault(c, m.path)
    unified, ucontrollers = None, frozenset[str]()
    for m in mounts:
        if m.fstype == "cgroup2":
            cs = controllers_of(m.path)
            if unified is None or len(cs) > len(ucontrollers):
                unified, ucontrollers = m.path, cs

    def layout(kind: Literal["v2", "v1", "none"], reason: str) -> Layout:
        return Layout(kind, reason, unified, ucontrollers, hierarchies, filesystems)

    names = " ".join(sorted(ucontrollers))
    if unified is not None and set(V2_REQUIRED) <= ucontrollers:
        return layout("v2", f"cgroup2 at {unified} has {names}")
    if hierarchies:
        hybrid = "" if unified is None else (
            f"; the cgroup2 mount at {unified} is ignored (controllers: {names or 'none'})")
        return layout("v1", f"cgroup v1 hierarchies carry the controllers{hybrid}")
    if unified is not None and ucontrollers:
        return layout("v2", f"cgroup2 at {unified} has only {names}")
    supported = " and ".join(sorted(filesystems)) or "no cgroup filesystem"
    return layout("none", f"no cgroup controllers are mounted (kernel supports {supported})")
