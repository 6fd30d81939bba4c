"""Channel 3's sockets as its service holds them: what the service reads and dumps
(protocols, so that tests pass fakes), the kernel's opener, one socket's record, and the
service's counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Protocol

from agent.monitor.net import adapter
from agent.monitor.net.diagwire import Listener

__all__ = ["Dumper", "KernelOpener", "Opener", "Readable", "Stats"]


class Readable(Protocol):
    what: str
    lost: int

    def fileno(self) -> int: ...
    def read(self, max_datagrams: int) -> list[bytes]: ...
    def close(self) -> None: ...


class Dumper(Protocol):
    what: str

    def listeners(self) -> tuple[list[Listener], bool]: ...
    def close(self) -> None: ...


class Opener(Protocol):
    """Makes the sockets (agent.monitor.net.adapter; tests pass fakes)."""

    def conntrack(self, pool: IPv4Network) -> Readable: ...
    def nflog(self, group: int, netns: Path | None) -> Readable: ...
    def diag(self, netns: Path) -> Dumper: ...


class KernelOpener:
    def conntrack(self, pool: IPv4Network) -> Readable:
        return adapter.open_conntrack(pool)

    def nflog(self, group: int, netns: Path | None) -> Readable:
        return adapter.open_nflog(group, netns)

    def diag(self, netns: Path) -> Dumper:
        return adapter.open_diag(netns)


@dataclass(eq=False)
class _Source:
    kind: str  # "ct" or "log"
    sock: Readable
    cell: str | None = None  # the cell whose netns it reads (None: the host's)
    netns: Path | None = None
    lost_seen: int = 0
    uid_base: int | None = None  # kept for a retired socket (its cell is gone)
    diag: Dumper | None = None  # a cell's: its listeners, dumped on demand


@dataclass
class Stats:
    events: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    failures: int = 0
    errors: int = 0
