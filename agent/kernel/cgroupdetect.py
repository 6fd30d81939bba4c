"""Which cgroup layout the kernel offers, and the backend that fits it.

The layout is decided from ``/proc/self/mounts`` and ``/proc/filesystems``
(and the unified mount's ``cgroup.controllers``):

* ``"v2"``: a cgroup2 mount has the controllers the v2 backend needs;
* ``"v1"``: legacy hierarchies carry the controllers.  A hybrid host (v1
  controllers plus a cgroup2 mount at /sys/fs/cgroup/unified holding none or
  only a few, e.g. hugetlb) counts as v1: the cells' limits live in v1;
* ``"none"``: nothing usable is mounted.

The parsers and :func:`classify` are pure; :func:`detect` and
:func:`open_backend` read the files under parameterized roots.
"""

from __future__ import annotations

import errno
from pathlib import Path

from agent.core.cgroup import ALL_FEATURES
from agent.core.cgroupmode import Layout, classify, parse_filesystems, parse_mounts
from agent.core.errors import KernelError
from agent.kernel.cgroup import CgroupBackend
from agent.kernel.cgroupv2 import CgroupV2

__all__ = ["FEATURE_LOSS", "describe", "detect", "features", "open_backend"]


# What the agent loses without each feature (for describe() and docs/cgroup-v1.md).
FEATURE_LOSS = {
    "psi": "no per-cell pressure: the tuner cannot wait on PSI triggers and resizes "
    "from periodic samples (memory.failcnt, usage), so a burst is seen at the next "
    "sample, not within a trigger window",
    "memory.high": "memory_high becomes memory.soft_limit_in_bytes: reclaimed to only "
    "under global memory pressure, never throttled; lowering memory goes straight to "
    "the hard limit, which v1 refuses (EBUSY) rather than OOM-kill when it cannot reclaim",
    "memory.min": "memory_min is recorded, not enforced: a cell's memory is not "
    "protected from reclaim",
    "cgroup.kill": "kill is freeze, SIGKILL every process, thaw, wait until empty",
    "freeze": "cells cannot be frozen: the reclaim loop escalates from throttle to stop",
    "io.weight": "io_weight is ignored",
    "memory.reclaim": "no proactive reclaim of idle cells: only the soft limit under "
    "global pressure",
}


def detect(proc_root: Path = Path("/proc"), fs_root: Path = Path("/")) -> Layout:
    """Read the layout of the running kernel.  Mount points are taken relative to
    ``fs_root`` when reading a cgroup2 mount's ``cgroup.controllers``."""

    def read(path: Path) -> str:
        try:
            return path.read_text()
        except OSError as exc:
            raise KernelError.from_oserror("read", str(path), exc, "is /proc mounted?") from exc

    def controllers_of(mount: Path) -> frozenset[str]:
        try:
            text = (fs_root / mount.relative_to("/")).joinpath("cgroup.controllers").read_text()
        except (OSError, ValueError):
            return frozenset()
        return frozenset(text.split())

    return classify(parse_mounts(read(proc_root / "self" / "mounts")),
                    parse_filesystems(read(proc_root / "filesystems")), controllers_of)


def open_backend(config_cgroup_root: Path, proc_root: Path = Path("/proc"), *,
                 fs_root: Path = Path("/"), layout: Layout | None = None) -> CgroupBackend:
    """The backend for this kernel.  ``config_cgroup_root`` is the configured v2
    subtree (``/sys/fs/cgroup/agent``); on v1 its last component names the
    agent's subtree in every hierarchy.  Nothing is created: call ``setup()``."""
    layout = layout or detect(proc_root, fs_root)
    root = Path(config_cgroup_root)
    if layout.kind == "v2":
        mount = layout.unified if layout.unified and root.is_relative_to(layout.unified) \
            else root.parent
        return CgroupV2(root, mount=mount)
    if layout.kind == "v1":
        hierarchies = {c: fs_root / p.relative_to("/") for c, p in layout.hierarchies.items()}
        try:  # the optional extra agent[cgroupv1]: only v1 kernels need cgroupspy
            from agent.kernel.cgroupv1 import CgroupV1
        except ImportError as exc:
            raise KernelError(
                "load cgroup-v1 backend", "cgroupspy", errno.ENOPKG,
                f"this kernel has only cgroup v1, which needs cgroupspy: {exc}",
            ) from exc
        return CgroupV1(root.parent, root.name, hierarchies=hierarchies)
    raise KernelError(
        "detect cgroups", str(proc_root / "self" / "mounts"), errno.ENOENT,
        f"{layout.reason}: mount cgroup2 on /sys/fs/cgroup (or v1 hierarchies)",
    )


def features(backend: CgroupBackend) -> frozenset[str]:
    """Capabilities of a backend (names from ALL_FEATURES).  A backend with a
    ``features`` attribute says so itself; the v2 backend is probed here."""
    own = getattr(backend, "features", None)
    if isinstance(own, frozenset):
        return own
    out = {"memory.high", "memory.min"}
    root = backend.root
    for name, probe in (("psi", "cpu.pressure"), ("cgroup.kill", "cgroup.kill"),
                        ("freeze", "cgroup.freeze"), ("memory.reclaim", "memory.reclaim")):
        if (root / probe).exists():
            out.add(name)
    if isinstance(backend, CgroupV2) and "io" in backend.controllers():
        out.add("io.weight")
    return frozenset(out)


def describe(layout: Layout, feats: frozenset[str] | None = None) -> str:
    """A few human lines: the layout, and on v1 what degrades and how."""
    lines = [f"cgroup layout: {layout.kind} ({layout.reason})"]
    if layout.kind == "v1":
        where = ", ".join(f"{c} at {p}" for c, p in sorted(layout.hierarchies.items()))
        lines.append(f"hierarchies: {where}")
    if layout.kind == "none":
        return "\n".join(lines)
    if feats is None:
        feats = frozenset({"memory.high", "memory.min"}) if layout.kind == "v2" else frozenset()
    missing = [f for f in ALL_FEATURES if f not in feats]
    if not missing:
        lines.append("nothing degrades")
    for f in missing:
        lines.append(f"degraded: no {f}: {FEATURE_LOSS[f]}")
    return "\n".join(lines)
