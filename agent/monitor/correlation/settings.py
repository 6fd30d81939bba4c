"""The correlation service's settings: the ``[correlation]`` table of agentd.toml.

Every key is optional (docs/patterns.md, "The service"); a wrong key or type is a
:class:`~agent.core.errors.ConfigError` (``E_CONFIG``) naming ``correlation.KEY`` and
saying how to fix it.  Pure: the caller reads the file.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from agent.core.errors import ConfigError

__all__ = ["Settings", "parse_settings"]


@dataclass(frozen=True)
class Settings:
    enabled: bool = True
    keys_dir: Path = Path("/etc/agent/keys")  # pinned public keys: *.pub
    bundle: Path = Path("/etc/agent/patterns/default.bundle")  # shipped; .sig beside it
    update_dir: Path = Path("/var/lib/agent/patterns/incoming")  # the fleet's drop dir
    store_dir: Path = Path("/var/lib/agent/patterns/loaded")  # what was loaded from it
    queue: int = 8192  # events waiting for the engine; beyond, the oldest are dropped
    batch: int = 256  # events fed per turn of the loop
    alerts_kept: int = 32  # the last alerts `agentctl patterns` shows
    dropped_every_s: float = 10.0  # at most one correlation/dropped per this many s
    expire_every_s: float = 5.0  # frees expired partial matches while some are alive

    def to_wire(self) -> dict[str, Any]:
        return {f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v
                for f in fields(self)}


def _err(key: str, message: str, hint: str) -> ConfigError:
    return ConfigError("E_CONFIG", f"`correlation.{key}` {message}", hint)


def _path(v: Any, key: str) -> Path:
    if not isinstance(v, str) or not v.startswith("/"):
        raise _err(key, "must be an absolute path string", f'write e.g. {key} = "/..."')
    return Path(v)


def _bool(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise _err(key, "must be true or false", f"write {key} = true (no quotes)")
    return v


def _int(lo: int, hi: int) -> Callable[[Any, str], int]:
    def conv(v: Any, key: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise _err(key, f"must be an integer from {lo} to {hi}", f"write e.g. {key} = {lo}")
        return v
    return conv


def _seconds(lo: float, hi: float) -> Callable[[Any, str], float]:
    def conv(v: Any, key: str) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise _err(key, f"must be a number of seconds from {lo:g} to {hi:g}",
                       f"write e.g. {key} = {hi / 10:g}")
        return float(v)
    return conv


_KEYS: dict[str, Callable[[Any, str], Any]] = {
    "enabled": _bool, "keys_dir": _path, "bundle": _path, "update_dir": _path,
    "queue": _int(64, 1 << 20), "batch": _int(1, 65536), "alerts_kept": _int(0, 1024),
    "dropped_every_s": _seconds(0.01, 3600.0), "expire_every_s": _seconds(0.01, 3600.0),
}


def parse_settings(table: Mapping[str, Any] | None, state_dir: Path = Path("/var/lib/agent"),
                   ) -> Settings:
    """The ``[correlation]`` table (None: all defaults).  The update and store
    directories default to ``<state_dir>/patterns/incoming`` and ``.../loaded``."""
    base = Settings(update_dir=state_dir / "patterns" / "incoming",
                    store_dir=state_dir / "patterns" / "loaded")
    if table is None:
        return base
    if not isinstance(table, Mapping):
        raise ConfigError("E_CONFIG", "`correlation` must be a table",
                          "write it as a [correlation] section")
    values: dict[str, Any] = {}
    for key, value in table.items():
        conv = _KEYS.get(key)
        if conv is None:
            near = difflib.get_close_matches(str(key), list(_KEYS), n=1)
            raise ConfigError("E_CONFIG", f"unknown key `correlation.{key}`",
                              f"did you mean `{near[0]}`?" if near else
                              f"known keys: {', '.join(sorted(_KEYS))}")
        values[key] = conv(value, key)
    out = replace(base, **values)
    if out.batch > out.queue:
        raise _err("batch", f"({out.batch}) exceeds correlation.queue ({out.queue})",
                   "a batch is at most the queue")
    return out
