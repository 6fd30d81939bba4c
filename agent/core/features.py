"""The kernel-feature report behind ``agentctl checkconfig`` and agentd's start-up log:
the kernel config's verdict for each feature (:mod:`agent.core.kconfig`) combined with the
live probes' results (:mod:`agent.kernel.probes`) into one status per feature, a summary
line and a JSON form.  Pure: the probes are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from agent.core.kconfig import (
    Feature,
    KernelConfig,
    Status,
    config_status,
)

__all__ = ["FeatureReport", "Probe", "Report", "summarize", "to_json"]


@dataclass(frozen=True)
class Probe:
    """Result of one live check: ``ok`` is True, False or None (cannot tell);
    ``partial`` marks a feature that exists but not as the agent wants it."""

    ok: bool | None
    detail: str = ""
    partial: bool = False


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
