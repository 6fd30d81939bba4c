"""The daemon's own configuration, ``/etc/agent/agentd.toml``.

Every key is optional; a missing file means all defaults.  Unknown keys and wrong types
are refused with a :class:`ConfigError` naming the key and saying how to fix it, so a
typo never silently falls back to a default.  Layout (see rootfs-overlay/etc/agent/agentd.toml)::

    socket_path, state_dir, run_dir, services_dir, policy_path, cgroup_root, log_level
    [network]      bridge, address_pool, vlan_min, vlan_max
    [userns]       enabled, uid_base, uid_size, slots
    [host_reserve] cpu, memory, pids
    [logs]         cell_buffer, journal_max
    [data]         default_size, max_size, state_reserve
    [limits]       output_rate, output_burst, trap_rate, trap_burst
    [responses]    "channel/kind" = "record|kill|freeze|isolate|stop" (agent.core.responses)
    [correlation]  channel 4's settings, checked by agent.monitor.correlation.settings

Sizes are integers (bytes) or strings such as "96M", "64K", "1G" (binary multiples).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.core.errors import ConfigError
from agent.core.responses import ResponsePolicy, parse_responses

__all__ = [
    "DATA_MIN_SIZE",
    "DEFAULT_CONFIG_PATH",
    "LOG_LEVELS",
    "AgentConfig",
    "HostReserve",
    "load_config",
    "parse_config",
    "parse_size",
]

DEFAULT_CONFIG_PATH = Path("/etc/agent/agentd.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")
_SIZE_RE = re.compile(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
_DEFAULT_POOL = ipaddress.IPv4Network("10.77.0.0/16")
_MULT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# The smallest data dir: an ext4 image below this is mostly its own journal and metadata.
DATA_MIN_SIZE = 4 << 20


def parse_size(value: int | str, key: str = "size") -> int:
    """Bytes from an integer or a string like "96M" (K, M, G, T are powers of 1024;
    an optional "B"/"iB" suffix is accepted)."""
    if isinstance(value, bool):
        raise ConfigError("E_CONFIG", f"`{key}` must be a size, got a boolean",
                          f'write e.g. {key} = "96M"')
    if isinstance(value, int):
        if value < 0:
            raise ConfigError("E_CONFIG", f"`{key}` must not be negative",
                              f'write e.g. {key.split(".")[-1]} = "96M"')
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m:
            return int(m.group(1)) * _MULT[m.group(2).lower()]
    raise ConfigError("E_CONFIG", f"`{key}` is not a size: {value!r}",
                      'write bytes as an integer or a string such as "64K", "96M", "1G"')


@dataclass(frozen=True)
class HostReserve:
    """What cells may never take from the host: CPUs, memory bytes, pids."""

    cpu: float = 0.25
    memory: int = 96 << 20
    pids: int = 256


@dataclass(frozen=True)
class AgentConfig:
    socket_path: Path = Path("/run/agent/agentd.sock")
    state_dir: Path = Path("/var/lib/agent")
    run_dir: Path = Path("/run/agent")
    services_dir: Path = Path("/etc/agent/services")
    policy_path: Path = Path("/etc/agent/policy.toml")
    cgroup_root: Path = Path("/sys/fs/cgroup/agent")
    log_level: str = "info"
    bridge: str = "agbr0"
    address_pool: ipaddress.IPv4Network = _DEFAULT_POOL
    vlan_min: int = 100
    vlan_max: int = 4000
    userns: bool = True
    uid_base: int = 100000
    uid_size: int = 65536
    uid_slots: int = 1024  # uid ranges cells' services may hold (agent.core.slots)
    host_reserve: HostReserve = field(default_factory=HostReserve)
    log_buffer_bytes: int = 64 << 10
    journal_max_bytes: int = 1 << 20
    # [data]: a data dir is an ext4 image of its own size (docs/data-dirs.md)
    data_default_size: int = 16 << 20  # when the manifest gives no writable.size
    data_max_size: int = 256 << 20  # ceiling on any one data dir's size
    # free space on state_dir's file system that data images may never take: the
    # journal (and its compaction copy) always has room
    data_state_reserve: int = 16 << 20
    # [limits]: what one cell may cost agentd's loop (agent.daemon.spawner.CellLimits)
    output_rate: int = 256 << 10  # bytes per second read from a cell's stdout+stderr
    output_burst: int = 1 << 20
    trap_rate: int = 10  # trapped syscalls answered per second, per cell (channel 2)
    trap_burst: int = 50
    # [responses]: what the master does about the monitors' events (docs/patterns.md)
    responses: ResponsePolicy = field(default_factory=ResponsePolicy)
    # [correlation]: kept as written; agentd checks it when it wires channel 4 (the
    # core does not import the monitors)
    correlation: Mapping[str, Any] | None = None

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "agentd.pid"

    @property
    def subnet_count(self) -> int:
        """How many /24 cell subnets the address pool holds."""
        return 1 << (24 - self.address_pool.prefixlen)

    def subnet_for_vlan(self, vlan: int) -> ipaddress.IPv4Network:
        """The /24 of VLAN ``vlan``: the (vlan - vlan_min)-th /24 of the pool."""
        index = vlan - self.vlan_min
        if not self.vlan_min <= vlan <= self.vlan_max or index >= self.subnet_count:
            raise ConfigError("E_CONFIG", f"VLAN {vlan} has no subnet in {self.address_pool}",
                              "use a VLAN in range or a larger network.address_pool")
        base = int(self.address_pool.network_address) + (index << 8)
        return ipaddress.IPv4Network((base, 24))

    def gateway_for_vlan(self, vlan: int) -> ipaddress.IPv4Address:
        """The host's address (.1) in the VLAN's /24."""
        return self.subnet_for_vlan(vlan).network_address + 1

    def uid_range(self, slot: int) -> tuple[int, int]:
        """(first host uid, count) mapped into the cell in user-namespace slot ``slot``
        (0 <= slot < ``uid_slots``; the slot follows the service name: agent.core.slots)."""
        if not 0 <= slot < self.uid_slots:
            raise ConfigError("E_CONFIG", f"user-namespace slot {slot} is outside 0.."
                              f"{self.uid_slots - 1}", "raise userns.slots")
        return self.uid_base + slot * self.uid_size, self.uid_size

    @property
    def data_dir(self) -> Path:
        """Where the data images live: ``<state_dir>/data``."""
        return self.state_dir / "data"

    def to_wire(self) -> dict[str, Any]:
        return {
            "socket_path": str(self.socket_path), "state_dir": str(self.state_dir),
            "run_dir": str(self.run_dir), "services_dir": str(self.services_dir),
            "policy_path": str(self.policy_path), "cgroup_root": str(self.cgroup_root),
            "log_level": self.log_level,
            "network": {"bridge": self.bridge, "address_pool": str(self.address_pool),
                        "vlan_min": self.vlan_min, "vlan_max": self.vlan_max},
            "userns": {"enabled": self.userns, "uid_base": self.uid_base,
                       "uid_size": self.uid_size, "slots": self.uid_slots},
            "host_reserve": {"cpu": self.host_reserve.cpu, "memory": self.host_reserve.memory,
                             "pids": self.host_reserve.pids},
            "logs": {"cell_buffer": self.log_buffer_bytes,
                     "journal_max": self.journal_max_bytes},
            "data": {"default_size": self.data_default_size, "max_size": self.data_max_size,
                     "state_reserve": self.data_state_reserve},
            "limits": {"output_rate": self.output_rate, "output_burst": self.output_burst,
                       "trap_rate": self.trap_rate, "trap_burst": self.trap_burst},
            "responses": {k: v.value for k, v in self.responses.rules.items()},
            "correlation": dict(self.correlation or {}),
        }


# ------------------------------------------------------------------------------ parsing

Conv = Callable[[Any, str], Any]


def _err(key: str, message: str, hint: str) -> ConfigError:
    return ConfigError("E_CONFIG", f"`{key}` {message}", hint)


def _path(v: Any, key: str) -> Path:
    if not isinstance(v, str) or not v.startswith("/"):
        raise _err(key, "must be an absolute path string",
                   f'write e.g. {key.split(".")[-1]} = "/..."')
    return Path(v)


def _int(lo: int, hi: int) -> Conv:
    def conv(v: Any, key: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _err(key, f"must be an integer, got {type(v).__name__}",
                       f"write e.g. {key.split('.')[-1]} = {lo}")
        if not lo <= v <= hi:
            raise _err(key, f"must be between {lo} and {hi}, got {v}", "pick a value in range")
        return v
    return conv


def _bool(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise _err(key, f"must be true or false, got {type(v).__name__}",
                   f"write {key.split('.')[-1]} = true (no quotes)")
    return v


def _name(v: Any, key: str) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", v):
        raise _err(key, "must be an interface name of 1-15 letters, digits, '_', '.', '-'",
                   f'write e.g. {key.split(".")[-1]} = "agbr0"')
    return v


def _level(v: Any, key: str) -> str:
    if not isinstance(v, str) or v.lower() not in LOG_LEVELS:
        raise _err(key, f"must be one of {', '.join(LOG_LEVELS)}", 'write log_level = "info"')
    return v.lower()


def _pool(v: Any, key: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(v) if isinstance(v, str) else None
    except ValueError:
        net = None
    if net is None or net.prefixlen > 24:
        raise _err(key, f"must be an IPv4 network of /24 or larger, got {v!r}",
                   'write e.g. address_pool = "10.77.0.0/16" (host bits zero)')
    return net


def _cpu(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1024:
        raise _err(key, "must be a number of CPUs between 0 and 1024", "write e.g. cpu = 0.25")
    return float(v)


def _size(v: Any, key: str) -> int:
    return parse_size(v, key)


# section -> {toml key: (AgentConfig field or "host_reserve.<f>", converter)}
_SCHEMA: dict[str, dict[str, tuple[str, Conv]]] = {
    "": {
        "socket_path": ("socket_path", _path), "state_dir": ("state_dir", _path),
        "run_dir": ("run_dir", _path), "services_dir": ("services_dir", _path),
        "policy_path": ("policy_path", _path), "cgroup_root": ("cgroup_root", _path),
        "log_level": ("log_level", _level),
    },
    "network": {
        "bridge": ("bridge", _name), "address_pool": ("address_pool", _pool),
        "vlan_min": ("vlan_min", _int(2, 4094)), "vlan_max": ("vlan_max", _int(2, 4094)),
    },
    "userns": {
        "enabled": ("userns", _bool), "uid_base": ("uid_base", _int(1, 2**32 - 2)),
        "uid_size": ("uid_size", _int(1, 2**32 - 2)),
        "slots": ("uid_slots", _int(1, 1 << 20)),
    },
    "host_reserve": {
        "cpu": ("host_reserve.cpu", _cpu), "memory": ("host_reserve.memory", _size),
        "pids": ("host_reserve.pids", _int(0, 2**22)),
    },
    "logs": {
        "cell_buffer": ("log_buffer_bytes", _size), "journal_max": ("journal_max_bytes", _size),
    },
    "data": {
        "default_size": ("data_default_size", _size), "max_size": ("data_max_size", _size),
        "state_reserve": ("data_state_reserve", _size),
    },
    "limits": {
        "output_rate": ("output_rate", _size), "output_burst": ("output_burst", _size),
        "trap_rate": ("trap_rate", _int(1, 1_000_000)),
        "trap_burst": ("trap_burst", _int(1, 1_000_000)),
    },
}


def _unknown(key: str, choices: list[str], source: str) -> ConfigError:
    leaf = key.split(".")[-1]
    close = difflib.get_close_matches(leaf, choices, n=1)
    if close:
        hint = f"did you mean `{close[0]}`?"
    else:
        hint = f"known keys here: {', '.join(sorted(choices))}"
        for section, keys in _SCHEMA.items():
            near = difflib.get_close_matches(leaf, list(keys), n=1)
            if near:
                where = f"the [{section}] section" if section else "the top level"
                hint = f"did you mean `{near[0]}` in {where}?"
                break
    return ConfigError("E_CONFIG", f"unknown key `{key}` in {source}", hint)


def parse_config(data: Mapping[str, Any], source: str = "agentd.toml") -> AgentConfig:
    """Validate a parsed TOML document into an :class:`AgentConfig`."""
    values: dict[str, Any] = {}
    reserve: dict[str, Any] = {}
    top_choices = list(_SCHEMA[""]) + [s for s in _SCHEMA if s] + ["responses", "correlation"]
    for key, value in data.items():
        if key == "responses":
            values["responses"] = parse_responses(value, f"[responses] in {source}")
        elif key == "correlation":
            if not isinstance(value, dict):
                raise ConfigError("E_CONFIG", f"`correlation` must be a table in {source}",
                                  "write it as a [correlation] section")
            values["correlation"] = dict(value)
        elif key in _SCHEMA and key:
            if not isinstance(value, dict):
                raise ConfigError("E_CONFIG", f"`{key}` must be a table in {source}",
                                  f"write it as a [{key}] section")
            section = _SCHEMA[key]
            for sub, subvalue in value.items():
                if sub not in section:
                    raise _unknown(f"{key}.{sub}", list(section), source)
                target, conv = section[sub]
                dest = reserve if target.startswith("host_reserve.") else values
                dest[target.removeprefix("host_reserve.")] = conv(subvalue, f"{key}.{sub}")
        elif key in _SCHEMA[""]:
            target, conv = _SCHEMA[""][key]
            values[target] = conv(value, key)
        else:
            raise _unknown(key, top_choices, source)
    cfg = AgentConfig(host_reserve=HostReserve(**reserve), **values)
    if cfg.vlan_min > cfg.vlan_max:
        raise ConfigError("E_CONFIG",
                          f"`network.vlan_min` ({cfg.vlan_min}) exceeds `network.vlan_max` "
                          f"({cfg.vlan_max}) in {source}", "swap the two values")
    if cfg.uid_base + cfg.uid_size * cfg.uid_slots > 2**32 - 1:
        raise ConfigError("E_CONFIG", f"`userns.uid_base` + `userns.uid_size` * `userns.slots` "
                          f"overflow 32 bits in {source}", "lower uid_base, uid_size or slots")
    _check_data(cfg, source)
    if cfg.output_rate < 1 << 10:
        raise ConfigError("E_CONFIG", f"`limits.output_rate` ({cfg.output_rate} B/s) is below "
                          f"1K in {source}: a cell's output would stall",
                          'write e.g. output_rate = "256K"')
    if cfg.output_burst < 64 << 10:
        raise ConfigError("E_CONFIG", f"`limits.output_burst` ({cfg.output_burst}) is below one "
                          f"64K read in {source}", 'write e.g. output_burst = "1M"')
    return cfg


def _check_data(cfg: AgentConfig, source: str) -> None:
    """[data]: sizes within the data dir floor, and a reserve the journal fits in."""
    floor = DATA_MIN_SIZE
    for key, v in (("default_size", cfg.data_default_size), ("max_size", cfg.data_max_size)):
        if v < floor:
            raise ConfigError("E_CONFIG", f"`data.{key}` ({v} bytes) is below the smallest "
                              f"data dir ({floor >> 20}M) in {source}", f'write {key} = "16M"')
    if cfg.data_default_size > cfg.data_max_size:
        raise ConfigError("E_CONFIG", f"`data.default_size` is above `data.max_size` in "
                          f"{source}", "raise max_size or lower default_size")
    need = 2 * cfg.journal_max_bytes
    if cfg.data_state_reserve < need:
        raise ConfigError("E_CONFIG", f"`data.state_reserve` ({cfg.data_state_reserve} bytes) "
                          f"is below twice `logs.journal_max` ({need} bytes) in {source}: "
                          "a compaction writes a second copy of the journal",
                          "raise state_reserve or lower journal_max")


def load_config(path: Path | str | None = DEFAULT_CONFIG_PATH, *,
                missing_ok: bool = True) -> AgentConfig:
    """Read and validate ``path``.  A missing file gives the defaults when ``missing_ok``."""
    if path is None:
        return AgentConfig()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return AgentConfig()
        raise ConfigError("E_CONFIG", f"config file `{path}` does not exist",
                          "create it or pass another --config") from None
    except OSError as exc:
        raise ConfigError("E_CONFIG", f"cannot read `{path}`: {exc.strerror}",
                          "check the file's permissions") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("E_CONFIG", f"`{path}` is not valid TOML: {exc}",
                          "fix the syntax at the position shown") from None
    return parse_config(data, str(path))
