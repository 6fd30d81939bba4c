"""Channel 1's settings (pure): ``/etc/agent/exec.toml``, beside the policy, optional.

::

    mode = "enforce"        # enforce | report | off
    allow_unsealed = false  # development only: cells whose image has no seal start
    signatures = "/var/lib/agent/exec/signatures.txt"
    rate = 1000             # exec checks per second per cell, then the cell waits
    burst = 1000
    cache = 8192            # hashes of image files kept (by inode, size, times)

``enforce`` denies an exec the rules refuse (fanotify permission events); ``report``
lets it run and reports it (also what ``enforce`` falls back to on a kernel without
permission events); ``off`` watches nothing.  An image without a seal stops its cell
from starting (``E_EXEC_UNSEALED``) unless ``allow_unsealed``: then the cell's execs are
checked against the signature database only, and its start is a notice.  Unknown keys
and wrong types are refused with the key named, like agentd.toml.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.core.errors import ConfigError

__all__ = ["MODES", "ExecSettings", "parse_settings", "settings_from_text"]

Mode = Literal["enforce", "report", "off"]
MODES: tuple[Mode, ...] = ("enforce", "report", "off")


@dataclass(frozen=True)
class ExecSettings:
    signatures: Path
    mode: Mode = "enforce"
    allow_unsealed: bool = False
    rate: float = 1000.0
    burst: float = 1000.0
    cache: int = 8192

    @property
    def enforce(self) -> bool:
        return self.mode == "enforce"

    def to_wire(self) -> dict[str, Any]:
        return {"mode": self.mode, "allow_unsealed": self.allow_unsealed,
                "signatures": str(self.signatures), "rate": self.rate, "burst": self.burst,
                "cache": self.cache}


def _err(source: str, key: str, what: str, hint: str) -> ConfigError:
    return ConfigError("E_CONFIG", f"{source}: `{key}` {what}", hint)


def _number(source: str, key: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise _err(source, key, f"must be a number from {lo:g} to {hi:g}, got {v!r}",
                   f"write e.g. {key} = 1000")
    return float(v)


def parse_settings(table: Mapping[str, Any] | None, state_dir: Path,
                   source: str = "exec.toml") -> ExecSettings:
    """The settings of a decoded ``exec.toml`` (None: the defaults)."""
    default = ExecSettings(signatures=state_dir / "exec" / "signatures.txt")
    if not table:
        return default
    known = ("mode", "allow_unsealed", "signatures", "rate", "burst", "cache")
    out: dict[str, Any] = {}
    for key, v in table.items():
        if key == "mode":
            if v not in MODES:
                raise _err(source, key, f"must be one of {', '.join(MODES)}, got {v!r}",
                           'write mode = "enforce"')
            out[key] = v
        elif key == "allow_unsealed":
            if not isinstance(v, bool):
                raise _err(source, key, "must be true or false", "write allow_unsealed = false")
            out[key] = v
        elif key == "signatures":
            if not isinstance(v, str) or not v.startswith("/") or "\0" in v:
                raise _err(source, key, "must be an absolute path",
                           'write signatures = "/var/lib/agent/exec/signatures.txt"')
            out[key] = Path(v)
        elif key in ("rate", "burst"):
            out[key] = _number(source, key, v, 1, 1e6)
        elif key == "cache":
            if isinstance(v, bool) or not isinstance(v, int) or not 16 <= v <= 1 << 20:
                raise _err(source, key, f"must be an integer from 16 to {1 << 20}, got {v!r}",
                           "write cache = 8192")
            out[key] = v
        else:
            raise _err(source, key, "is not a setting of channel 1",
                       f"known keys: {', '.join(known)}")
    return ExecSettings(**{"signatures": default.signatures, **out})


def settings_from_text(text: str, state_dir: Path, source: str = "exec.toml") -> ExecSettings:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("E_CONFIG", f"{source}: TOML syntax: {exc}",
                          "see docs/exec.md for the keys") from None
    return parse_settings(table, state_dir, source)
