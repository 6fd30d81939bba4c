"""The tuner's and the reclaim loop's settings as read from ``agentd.toml`` (sections
``[tuner]`` and ``[reclaim]``): every key checked against the dataclass it fills, unknown
keys and bad values refused with the key's name (docs/tuner.md lists them).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.core.errors import ConfigError
from agent.core.reclaim import ReclaimConfig
from agent.core.tunerstate import TunerConfig

__all__ = ["Settings", "load_settings"]


@dataclasses.dataclass(frozen=True)
class Settings:
    tuner: TunerConfig = dataclasses.field(default_factory=TunerConfig)
    reclaim: ReclaimConfig = dataclasses.field(default_factory=ReclaimConfig)
    sample_s: float = 5.0
    sample_max_s: float = 60.0
    stall_us: int = 150_000
    window_us: int = 1_000_000
    period_s: float = 10.0
    scan_s: float = 30.0


def _section(d: Mapping[str, Any], cls: type[Any], extra: tuple[str, ...], where: str
             ) -> tuple[Any, dict[str, Any]]:
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - names - set(extra))
    if bad:
        raise ConfigError("E_CONFIG", f"{where}: unknown keys {', '.join(bad)}",
                          f"known: {', '.join(sorted(names | set(extra)))}")
    try:
        obj = cls(**{k: v for k, v in d.items() if k in names})
    except TypeError as exc:
        raise ConfigError("E_CONFIG", f"{where}: {exc}") from None
    return obj, {k: v for k, v in d.items() if k in extra}


def load_settings(path: Path) -> Settings:
    """The settings in ``path``; defaults when it does not exist."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        return Settings()
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("E_CONFIG", f"{path}: {exc}") from None
    tc, t_extra = _section(doc.get("tuner", {}), TunerConfig,
                           ("sample_s", "sample_max_s", "stall_us", "window_us"), f"{path} [tuner]")
    rc, r_extra = _section(doc.get("reclaim", {}), ReclaimConfig, ("period_s", "scan_s"),
                           f"{path} [reclaim]")
    return Settings(tc, rc, **t_extra, **r_extra)
