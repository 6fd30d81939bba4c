"""What the running kernel offers, probed through ``/proc`` and ``/sys`` under a root.

Each probe answers for one feature of :data:`agent.core.kconfig.FEATURES`;
:func:`check` combines the probes with the kernel's configuration
(:func:`agent.core.features.combine`) into the report ``agentctl checkconfig``
renders and agentd logs at start.  The cgroup probes ask the one layout detector,
:func:`agent.kernel.cgroupdetect.detect`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from agent.core.cgroupmode import Layout
from agent.core.errors import ConfigError, KernelError
from agent.core.features import Probe, Report, _combine
from agent.core.kconfig import (
    FEATURES,
    Feature,
    KernelConfig,
    parse_config,
    parse_config_gz,
)
from agent.kernel.cgroupdetect import detect
from agent.kernel.fanotify import permission_events

__all__ = ["PROBES", "check", "load_config"]


def _p(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _filesystems(root: Path) -> set[str] | None:
    text = _read(_p(root, "/proc/filesystems"))
    if text is None:
        return None
    return {line.split()[-1] for line in text.splitlines() if line.split()}


def _probe_namespaces(root: Path, release: str) -> Probe:
    nsdir = _p(root, "/proc/self/ns")
    if not nsdir.is_dir():
        return Probe(None, f"{nsdir} not readable")
    absent = [n for n in ("mnt", "uts", "ipc", "pid", "net") if not (nsdir / n).exists()]
    if absent:
        return Probe(False, "no " + ", ".join(absent) + " in /proc/self/ns")
    return Probe(True)


def _probe_ns(name: str) -> Callable[[Path, str], Probe]:
    def probe(root: Path, release: str) -> Probe:
        nsdir = _p(root, "/proc/self/ns")
        if not nsdir.is_dir():
            return Probe(None, f"{nsdir} not readable")
        if not (nsdir / name).exists():
            return Probe(False, f"no /proc/self/ns/{name}")
        if name == "user":
            limit = _read(_p(root, "/proc/sys/user/max_user_namespaces"))
            if limit is not None and limit.strip() == "0":
                return Probe(True, "user.max_user_namespaces is 0", partial=True)
        return Probe(True)

    return probe


def _layout(root: Path) -> Layout | None:
    """The cgroup layout under ``root`` (the one detector, agent.kernel.cgroupdetect);
    None when /proc cannot be read."""
    try:
        return detect(_p(root, "/proc"), root)
    except KernelError:
        return None


def _probe_cgroups(root: Path, release: str) -> Probe:
    fs = _filesystems(root)
    if fs is None:
        return Probe(None, "/proc/filesystems not readable")
    if not fs & {"cgroup", "cgroup2"}:
        return Probe(False, "no cgroup filesystem in /proc/filesystems")
    return Probe(True)


def _probe_cgroup2(root: Path, release: str) -> Probe:
    fs = _filesystems(root)
    if fs is not None and "cgroup2" not in fs:
        return Probe(False, "no cgroup2 in /proc/filesystems")
    layout = _layout(root)
    if layout is not None and layout.kind == "v2":
        return Probe(True)
    if fs is None:
        return Probe(None, "/proc/filesystems not readable")
    return Probe(True, "cgroup2 built but not mounted as the unified hierarchy with the "
                       "controllers (cgroup v1 or hybrid host)", partial=True)


def _probe_controller(name: str, v1_name: str) -> Callable[[Path, str], Probe]:
    def probe(root: Path, release: str) -> Probe:
        layout = _layout(root)
        if layout is not None and layout.kind == "v2":
            if name in layout.unified_controllers:
                return Probe(True)
            return Probe(False, f"{name} not in {layout.unified}/cgroup.controllers")
        if layout is not None and v1_name in layout.hierarchies:
            return Probe(True, f"only on the cgroup v1 hierarchy ({v1_name})", partial=True)
        return Probe(None, "no cgroup v2 hierarchy to ask")

    return probe


def _probe_psi(root: Path, release: str) -> Probe:
    base = _p(root, "/proc/pressure")
    if not base.is_dir():
        return Probe(False, "no /proc/pressure")
    for res in ("cpu", "memory", "io"):
        try:
            (base / res).read_text()
        except FileNotFoundError:
            return Probe(False, f"no /proc/pressure/{res}")
        except OSError:
            return Probe(True, "PSI disabled at boot: add psi=1 to the kernel command line",
                         partial=True)
    return Probe(True)


def _probe_seccomp(root: Path, release: str) -> Probe:
    status = _read(_p(root, "/proc/self/status"))
    if status is not None and "Seccomp:" in status:
        return Probe(True)
    if _p(root, "/proc/sys/kernel/seccomp").is_dir():
        return Probe(True)
    if status is None:
        return Probe(None, "/proc/self/status not readable")
    return Probe(False, "no Seccomp field in /proc/self/status")


def _probe_seccomp_notify(root: Path, release: str) -> Probe:
    actions = _read(_p(root, "/proc/sys/kernel/seccomp/actions_avail"))
    if actions is None:
        return Probe(None, "/proc/sys/kernel/seccomp/actions_avail not readable")
    if "user_notif" in actions.split():
        return Probe(True)
    return Probe(False, "no user_notif in seccomp actions_avail (kernel older than 5.0?)")


def _probe_fanotify(root: Path, release: str) -> Probe:
    if not _p(root, "/proc/sys/fs/fanotify").is_dir():
        return Probe(None, "no /proc/sys/fs/fanotify (kernel older than 5.13 or no FANOTIFY)")
    if root != Path("/"):
        return Probe(True)
    perm = permission_events()  # a throw-away group: the running kernel only
    if perm is False:
        return Probe(True, "no permission events (CONFIG_FANOTIFY_ACCESS_PERMISSIONS): "
                     "exec protection is report-only", partial=True)
    return Probe(True, "" if perm else "permission events not checked (needs root)")


def _probe_module(name: str, kpath: str) -> Callable[[Path, str], Probe]:
    """Loaded (``/sys/module``, ``/proc/modules``), built in or loadable
    (``modules.builtin``/``modules.dep``)."""

    def probe(root: Path, release: str) -> Probe:
        if _p(root, f"/sys/module/{name}").is_dir():
            return Probe(True)
        mods = _read(_p(root, "/proc/modules"))
        if mods is not None and any(ln.split()[:1] == [name] for ln in mods.splitlines()):
            return Probe(True)
        moddir = _p(root, f"/lib/modules/{release}")
        for fname, what in (("modules.builtin", "built in"), ("modules.dep", "loadable")):
            text = _read(moddir / fname)
            if text is not None and f"{kpath}.ko" in text:
                return Probe(True, "" if what == "built in" else "module, not loaded yet")
        if mods is None and not moddir.is_dir():
            return Probe(None, "no module information (kernel without modules?)")
        return Probe(False, f"{name} neither loaded, built in nor installed")

    return probe


def _probe_fs(name: str) -> Callable[[Path, str], Probe]:
    def probe(root: Path, release: str) -> Probe:
        fs = _filesystems(root)
        if fs is None:
            return Probe(None, "/proc/filesystems not readable")
        if name in fs:
            return Probe(True)
        return Probe(None, f"{name} not registered (maybe a module not loaded yet)")

    return probe


def _probe_ikconfig(root: Path, release: str) -> Probe:
    if _p(root, "/proc/config.gz").exists():
        return Probe(True)
    return Probe(False, "no /proc/config.gz")


PROBES: Mapping[str, Callable[[Path, str], Probe]] = {
    "namespaces": _probe_namespaces,
    "user_ns": _probe_ns("user"),
    "cgroup_ns": _probe_ns("cgroup"),
    "cgroups": _probe_cgroups,
    "cgroup2": _probe_cgroup2,
    "ctrl_memory": _probe_controller("memory", "memory"),
    "ctrl_cpu": _probe_controller("cpu", "cpu"),
    "ctrl_pids": _probe_controller("pids", "pids"),
    "ctrl_io": _probe_controller("io", "blkio"),
    "ctrl_cpuset": _probe_controller("cpuset", "cpuset"),
    "psi": _probe_psi,
    "seccomp": _probe_seccomp,
    "seccomp_notify": _probe_seccomp_notify,
    "fanotify": _probe_fanotify,
    "mod_bridge": _probe_module("bridge", "net/bridge/bridge"),
    "mod_8021q": _probe_module("8021q", "net/8021q/8021q"),
    "mod_veth": _probe_module("veth", "drivers/net/veth"),
    "mod_nf_tables": _probe_module("nf_tables", "net/netfilter/nf_tables"),
    "fs_tmpfs": _probe_fs("tmpfs"),
    "fs_overlay": _probe_fs("overlay"),
    "ikconfig": _probe_ikconfig,
}


def load_config(root: Path, release: str) -> tuple[str, dict[str, str]] | None:
    """The running kernel's config: ``/proc/config.gz``, then
    ``/boot/config-<release>``, then ``/lib/modules/<release>/config``."""
    gz = _p(root, "/proc/config.gz")
    try:
        return str(gz), parse_config_gz(gz.read_bytes())
    except (OSError, ConfigError):
        pass
    for path in (_p(root, f"/boot/config-{release}"), _p(root, f"/lib/modules/{release}/config")):
        text = _read(path)
        if text is not None:
            return str(path), parse_config(text)
    return None


def check(root: Path = Path("/"), config: KernelConfig | None = None,
          config_source: str | None = None, release: str | None = None,
          features: Sequence[Feature] = FEATURES, probe: bool = True) -> Report:
    """Probe the kernel under ``root`` and read its config, unless ``config``
    is given.  ``probe=False`` judges the configuration alone."""
    rel = release or os.uname().release
    if config is None:
        found = load_config(root, rel)
        if found is not None:
            config_source, config = found
    reports = []
    for feat in features:
        fn = PROBES.get(feat.probe) if feat.probe and probe else None
        reports.append(_combine(feat, config, fn(root, rel) if fn else None))
    return Report(rel, config_source if config is not None else None, tuple(reports))
