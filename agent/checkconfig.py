"""``agentctl checkconfig``: what the running kernel offers the agent.

Like lxc-checkconfig: read the kernel configuration (``/proc/config.gz`` or
``/boot/config-<release>``), probe the live kernel through ``/proc`` and
``/sys``, and report each feature of ``agent.kconfig.FEATURES`` as present,
degraded, missing or unknown, with the consequence for the agent.

Combining the two sources (the probe speaks for the running kernel, the
config for what was built):

* probe ok      -> present (degraded if the config lacks a wanted option);
* probe partial -> degraded (built, but not usable as the agent wants);
* probe fails   -> missing;
* no probe, or the probe cannot tell -> what the config says; unknown
  without a config.

Every probe takes the filesystem root as a parameter, so the same code runs
against the live kernel (``/``) and against a directory tree in tests.
Exit status of :func:`cli_main`: 0 when every required feature is present
or degraded, 1 when a required feature is missing, 2 on a usage error or an
unreadable ``--config``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.errors import AgentError, ConfigError
from agent.kconfig import (
    FEATURES,
    Feature,
    KernelConfig,
    Status,
    config_status,
    parse_config,
    parse_config_gz,
)

__all__ = [
    "PROBES",
    "FeatureReport",
    "Probe",
    "Report",
    "check",
    "cli_main",
    "load_config",
    "render",
    "summarize",
    "to_json",
]


@dataclass(frozen=True)
class Probe:
    """Result of one live check: ``ok`` is True, False or None (cannot tell);
    ``partial`` marks a feature that exists but not as the agent wants it."""

    ok: bool | None
    detail: str = ""
    partial: bool = False


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


def _v2_controllers(root: Path) -> set[str] | None:
    text = _read(_p(root, "/sys/fs/cgroup/cgroup.controllers"))
    return None if text is None else set(text.split())


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
    if _v2_controllers(root) is not None:
        return Probe(True)
    if fs is None:
        return Probe(None, "/proc/filesystems not readable")
    return Probe(True, "cgroup2 built but not mounted as the unified hierarchy at "
                       "/sys/fs/cgroup (cgroup v1 or hybrid host)", partial=True)


def _probe_controller(name: str, v1_dir: str) -> Callable[[Path, str], Probe]:
    def probe(root: Path, release: str) -> Probe:
        ctrls = _v2_controllers(root)
        if ctrls is not None:
            if name in ctrls:
                return Probe(True)
            return Probe(False, f"{name} not in /sys/fs/cgroup/cgroup.controllers")
        if _p(root, f"/sys/fs/cgroup/{v1_dir}").is_dir():
            return Probe(True, f"only on the cgroup v1 hierarchy ({v1_dir})", partial=True)
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
    if _p(root, "/proc/sys/fs/fanotify").is_dir():
        return Probe(True)
    return Probe(None, "no /proc/sys/fs/fanotify (kernel older than 5.13 or no FANOTIFY)")


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


@dataclass(frozen=True)
class FeatureReport:
    feature: Feature
    status: Status
    detail: str

    @property
    def fatal(self) -> bool:
        return self.feature.required and self.status is Status.MISSING


@dataclass(frozen=True)
class Report:
    release: str
    config_source: str | None
    features: tuple[FeatureReport, ...]

    @property
    def ok(self) -> bool:
        return not any(f.fatal for f in self.features)

    def get(self, name: str) -> FeatureReport:
        for f in self.features:
            if f.feature.name == name:
                return f
        raise KeyError(name)


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


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _combine(feat: Feature, config: KernelConfig | None, probe: Probe | None) -> FeatureReport:
    reasons: list[str] = []
    if config is None:
        cstatus = Status.UNKNOWN
    elif probe is not None and probe.ok and not probe.partial:
        # the probe saw the feature work: options it asks to be unset are moot
        cstatus, reasons = config_status(config, replace(feat, unset=()))
    else:
        cstatus, reasons = config_status(config, feat)
    cdetail = "; ".join(reasons)
    if probe is None or probe.ok is None:
        pdetail = probe.detail if probe is not None and cstatus is Status.UNKNOWN else ""
        return FeatureReport(feat, cstatus, _join(cdetail, pdetail))
    if probe.ok is False:
        return FeatureReport(feat, Status.MISSING, _join(probe.detail, cdetail))
    if probe.partial or cstatus is Status.DEGRADED:
        return FeatureReport(feat, Status.DEGRADED, _join(probe.detail, cdetail))
    if cstatus is Status.MISSING:
        # the config names no such option but the running kernel has it: the
        # option was folded into another one, or the config is not this kernel's
        note = f"live kernel has it ({cdetail})"
        return FeatureReport(feat, Status.PRESENT, _join(probe.detail, note))
    return FeatureReport(feat, Status.PRESENT, probe.detail)


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


_MARK = {Status.PRESENT: "present", Status.DEGRADED: "DEGRADED",
         Status.MISSING: "MISSING", Status.UNKNOWN: "unknown"}


def render(report: Report, width: int = 80) -> str:
    """lxc-checkconfig-like text, lines at most ``width`` columns."""
    source = report.config_source or "not found (probes only)"
    lines = [f"Kernel {report.release}"]
    if len(source) + 8 > width:  # a long path goes on its own line, unbroken
        lines += ["Config:", f"  {source}", ""]
    else:
        lines += [f"Config: {source}", ""]
    for f in report.features:
        tag = "*" if f.feature.required else " "
        head = f"{tag} {f.feature.title}"
        mark = _MARK[f.status]
        dots = max(1, width - len(head) - len(mark) - 2)
        if len(head) + len(mark) + 2 > width:
            head = head[: width - len(mark) - 3]
            dots = 1
        lines.append(f"{head} {'.' * dots} {mark}"[:width])
        extra = []
        if f.detail:
            extra.append(f.detail)
        if f.status is Status.MISSING:
            extra.append("-> " + f.feature.consequence)
        elif f.status is Status.DEGRADED:
            extra.append("-> " + f.feature.degraded_consequence)
        for e in extra:
            lines.extend(textwrap.wrap(e, width=width, initial_indent="    ",
                                       subsequent_indent="      "))
    lines.append("")
    lines.append("* required: checkconfig exits 1 when one of these is missing")
    missing = [f.feature.name for f in report.features if f.fatal]
    lines.append("Result: " + ("ok" if not missing else "missing " + ", ".join(missing)))
    return "\n".join(lines) + "\n"


def _consequence(f: FeatureReport) -> str:
    if f.status is Status.MISSING:
        return f.feature.consequence
    if f.status is Status.DEGRADED:
        return f.feature.degraded_consequence
    return ""


def to_json(report: Report) -> dict[str, Any]:
    return {
        "release": report.release,
        "config": report.config_source,
        "ok": report.ok,
        "features": [
            {"name": f.feature.name, "title": f.feature.title, "status": f.status.value,
             "required": f.feature.required, "detail": f.detail,
             "consequence": _consequence(f)}
            for f in report.features
        ],
    }


def summarize(report: Report) -> list[str]:
    """Log lines for agentd at start: one overview, then one per feature that
    is not present, with its consequence."""
    counts = {s: sum(1 for f in report.features if f.status is s) for s in Status}
    out = [f"kernel {report.release}: {counts[Status.PRESENT]} features present, "
           f"{counts[Status.DEGRADED]} degraded, {counts[Status.MISSING]} missing, "
           f"{counts[Status.UNKNOWN]} unknown (config: {report.config_source or 'none'})"]
    for f in report.features:
        if f.status is Status.PRESENT:
            continue
        kind = "required feature" if f.feature.required else "feature"
        line = f"{kind} {f.feature.name} {f.status.value}"
        if f.detail:
            line += f" ({f.detail})"
        if f.status is not Status.UNKNOWN:
            line += f": {_consequence(f)}"
        out.append(line)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agentctl checkconfig",
        description="Report the kernel features the agent uses: present, degraded, missing.",
        epilog="exit status: 0 all required features usable, 1 a required feature is "
               "missing, 2 usage error or unreadable --config")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="kernel .config (plain or gzip) instead of the running kernel's")
    p.add_argument("--root", type=Path, metavar="DIR",
                   help="probe /proc and /sys under DIR (default /; with --config and "
                        "no --root the config is judged alone, without probes)")
    p.add_argument("--release", metavar="RELEASE", help="kernel release (default uname -r)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def cli_main(argv: list[str]) -> int:
    try:
        ns = _parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    config: dict[str, str] | None = None
    source: str | None = None
    try:
        if ns.config is not None:
            data = ns.config.read_bytes()
            config = parse_config_gz(data) if data[:2] == b"\x1f\x8b" else parse_config(
                data.decode("utf-8", errors="replace"))
            source = str(ns.config)
    except OSError as exc:
        print(f"agentctl: error[E_KCONFIG]: cannot read `{ns.config}`: {exc.strerror}",
              file=sys.stderr)
        return 2
    except AgentError as exc:
        print(f"agentctl: {exc}", file=sys.stderr)
        return 2
    probe = ns.root is not None or ns.config is None
    report = check(ns.root or Path("/"), config, source, ns.release, probe=probe)
    if ns.json:
        print(json.dumps(to_json(report), indent=2))
    else:
        sys.stdout.write(render(report))
    return 0 if report.ok else 1
