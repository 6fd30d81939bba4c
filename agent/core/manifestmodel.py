"""The service manifest as data: frozen records, their bounds and names
(:mod:`agent.core.manifest` decodes TOML into them; ``docs/manifest.md`` documents every
key).  Everything here is re-exported by :mod:`agent.core.manifest`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.core import units
from agent.core.units import ConfigProblems

__all__ = [
    "MAX_ID",
    "MAX_STRING",
    "MAX_WRITABLE",
    "MIN_CPU_MAX",
    "MIN_MEMORY_MAX",
    "NAME_RE",
    "PRIORITY_NAMES",
    "DataDir",
    "EgressRule",
    "Lifecycle",
    "Manifest",
    "ManifestError",
    "Network",
    "Peer",
    "Privileges",
    "Resources",
    "Service",
    "Tmpfs",
]

NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")  # DNS label, <= 32 chars

MIN_CPU_MAX = 10  # millicpu: cpu.max cannot go below 1 ms of quota per 100 ms period
MIN_MEMORY_MAX = 1 << 20  # 1 MiB: nothing runs in less
MAX_ID = 65535  # uid/gid inside the cell: the user namespace maps 65536 ids
MAX_WRITABLE = 16
MAX_STRING = 4096

PRIORITY_NAMES: dict[str, int] = {"low": 20, "normal": 50, "high": 80}


class ManifestError(ConfigProblems):
    """A manifest is invalid (``E_MANIFEST``) or its image lacks something (``E_IMAGE``)."""


@dataclass(frozen=True)
class Service:
    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Tmpfs:
    path: str
    size: int
    exec: bool = False


@dataclass(frozen=True)
class DataDir:
    """The persistent data dir: the data image of service ``source`` (the manifest's own
    name unless it reads another service's, which the policy must share), of ``size``
    bytes (None: agentd's data.default_size).  docs/data-dirs.md."""

    path: str
    source: str
    size: int | None = None


@dataclass(frozen=True)
class Resources:
    cpu_min: int = 0  # millicpu
    cpu_max: int = 1000
    memory_min: int = 0  # bytes
    memory_max: int = 64 << 20
    pids_max: int = 64
    io_weight: int = 100
    priority: int = PRIORITY_NAMES["normal"]


@dataclass(frozen=True)
class Peer:
    cell: str
    ports: tuple[int, ...]
    proto: Literal["tcp", "udp"] = "tcp"


@dataclass(frozen=True)
class EgressRule:
    cidr: str | None = None  # None: any address
    port: int | None = None  # None: any port
    proto: Literal["tcp", "udp", "any"] = "any"

    def __str__(self) -> str:
        port = "" if self.port is None else str(self.port)
        if port and self.proto != "any":
            port += "/" + self.proto
        return " ".join(x for x in (self.cidr or "", port) if x)


@dataclass(frozen=True)
class Network:
    vlan: int | Literal["auto"] = "auto"
    peers: tuple[Peer, ...] = ()
    egress_any: bool = False  # egress = true
    egress: tuple[EgressRule, ...] = ()


@dataclass(frozen=True)
class Lifecycle:
    mode: Literal["oneshot", "service"] = "service"
    restart: Literal["no", "on-failure", "always"] = "on-failure"
    backoff_initial_ms: int = 1000
    backoff_max_ms: int = 60_000
    destroy_on_exit: bool = True


@dataclass(frozen=True)
class Privileges:
    capabilities: tuple[str, ...] = ()  # sorted, CAP_ prefixed
    ops: tuple[str, ...] = ()


@dataclass(frozen=True)
class Manifest:
    name: str
    service: Service
    image_root: str
    description: str = ""
    tmpfs: tuple[Tmpfs, ...] = ()
    data: DataDir | None = None
    resources: Resources = field(default_factory=Resources)
    network: Network | None = None  # None: loopback only
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    privileges: Privileges = field(default_factory=Privileges)
    source: str = field(default="<string>", compare=False)
    image_seal: str | None = None  # [image] seal; None: <root>.seal (docs/exec.md)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``agentctl inspect``; it is also valid manifest input."""
        s, r, lc = self.service, self.resources, self.lifecycle
        d: dict[str, Any] = {"name": self.name}
        if self.description:
            d["description"] = self.description
        d["service"] = {"command": s.command, "args": list(s.args), "env": dict(s.env),
                        "workdir": s.workdir, "uid": s.uid, "gid": s.gid}
        d["image"] = {"root": self.image_root}
        if self.image_seal is not None:
            d["image"]["seal"] = self.image_seal
        w: list[dict[str, Any]] = [{"kind": "tmpfs", "path": t.path,
                                    "size": units.format_size(t.size), "exec": t.exec}
                                   for t in self.tmpfs]
        if self.data:
            dd: dict[str, Any] = {"kind": "data", "path": self.data.path,
                                  "source": self.data.source}
            if self.data.size is not None:
                dd["size"] = units.format_size(self.data.size)
            w.append(dd)
        d["writable"] = w
        d["resources"] = {"cpu_min": units.format_cpu(r.cpu_min),
                          "cpu_max": units.format_cpu(r.cpu_max),
                          "memory_min": units.format_size(r.memory_min),
                          "memory_max": units.format_size(r.memory_max),
                          "pids_max": r.pids_max, "io_weight": r.io_weight,
                          "priority": r.priority}
        if self.network is not None:
            n = self.network
            d["network"] = {
                "vlan": n.vlan,
                "peers": [{"cell": p.cell, "ports": list(p.ports), "proto": p.proto}
                          for p in n.peers],
                "egress": True if n.egress_any else [str(e) for e in n.egress] or False,
            }
        d["lifecycle"] = {"mode": lc.mode, "restart": lc.restart,
                          "backoff": {"initial": units.format_duration(lc.backoff_initial_ms),
                                      "max": units.format_duration(lc.backoff_max_ms)},
                          "destroy_on_exit": lc.destroy_on_exit}
        d["privileges"] = {"capabilities": list(self.privileges.capabilities),
                           "ops": list(self.privileges.ops)}
        return d
