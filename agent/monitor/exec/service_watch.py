"""Channel 1's service, its records (the loop side of :mod:`agent.monitor.exec.service`):
what the service reads of the cell manager, one cell's watch, one event being checked,
and the attributes of a refusal's event.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.core.cell import State
from agent.core.errors import AgentError, ConfigError
from agent.core.manifest import Manifest
from agent.core.ratelimit import TokenBucket
from agent.core.seal import Seal
from agent.kernel.fanotify import FanEvent, Group
from agent.kernel.seal import hash_fd
from agent.monitor.exec.adapter import Facts, SealCache
from agent.monitor.exec.rules import SEAL_SUFFIX, Observed, Verdict, seal_path_of

__all__ = ["Backend", "Directory", "Entry", "Pending", "Watch", "data_source", "denial_attrs",
           "hash_and_close", "ignore_unchanged", "load_seal", "queued", "written_attrs",
           "written_path"]


class Entry(Protocol):
    @property
    def manifest(self) -> Manifest: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def state(self) -> State: ...


class Directory(Protocol):
    """What the service reads of the cell manager."""

    @property
    def cells(self) -> Mapping[str, Entry]: ...


class Backend(Protocol):
    def pid_to_cell(self, pid: int) -> str | None: ...


@dataclass(eq=False)
class Watch:
    cell: str
    group: Group
    seal: Seal | None  # None: an unsealed image allowed for development
    image_dev: int
    bucket: TokenBucket
    data: tuple[str, str] | None = None  # its data dir: (mount point, source)
    registered: bool = False
    paused: asyncio.TimerHandle | None = None
    waiting: dict[int, Pending] = field(default_factory=dict)  # event fd -> pending
    closed: bool = False


@dataclass(eq=False)
class Pending:
    event: FanEvent
    facts: Facts | None = None
    cell: str = ""  # the cell of the process
    on_image: bool = False
    done: bool = False


def queued(group: Group, reads: int) -> Iterator[FanEvent]:
    """The events (with a file) still queued in ``group``, in at most ``reads`` reads;
    a read that fails ends it (the group is about to be closed)."""
    for _ in range(reads):
        try:
            events = group.read()
        except (AgentError, ValueError):
            return
        if not events:
            return
        yield from (ev for ev in events if ev.fd >= 0)


def hash_and_close(fd: int) -> tuple[str, int]:
    """Hash a duplicate of an event's fd (worker thread), closing it."""
    try:
        return hash_fd(fd)
    finally:
        os.close(fd)


def ignore_unchanged(group: Group, fd: int, f: Facts) -> bool:
    """Let the kernel answer the next execs of an allowed image file itself (an ignored
    mask, cleared by the kernel when the file is written), unless it changed since it
    was hashed (then a write may have come before the mask: removed).  Whether it is
    ignored; a kernel refusing the mark (marks used up) only costs the fast path."""
    try:
        group.ignore(fd)
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (f.size, f.mtime_ns, f.ctime_ns):
            group.unignore(fd)
            return False
    except (AgentError, OSError):
        return False
    return True


def load_seal(seals: SealCache, cell: str, rootfs: str, m: Manifest | None,
              allow_unsealed: bool) -> tuple[str, Seal | None]:
    """(where the seal of the cell's image is, the seal); None for an image without one
    when ``allow_unsealed``, else ConfigError ``E_EXEC_UNSEALED``."""
    seal_file = seal_path_of(m) if m is not None else rootfs.rstrip("/") + SEAL_SUFFIX
    seal = seals.load(seal_file)
    if seal is None and not allow_unsealed:
        raise ConfigError(
            "E_EXEC_UNSEALED", f"cell {cell}: its image {rootfs} has no seal {seal_file}",
            f"seal the image when it is built: agent-seal build {rootfs} -o {seal_file} "
            "(docs/exec.md); for development only, allow_unsealed = true in "
            "/etc/agent/exec.toml")
    return seal_file, seal


def data_source(owner: Watch | None, path: str) -> str | None:
    """The data dir's ``source`` when ``path`` lies in ``owner``'s data dir."""
    if owner is not None and owner.data is not None and (
            path + "/").startswith(owner.data[0].rstrip("/") + "/"):
        return owner.data[1]
    return None


def written_path(w: Watch, path: str, gone: bool) -> str:
    """Where the cell sees a written file.  Only data mounts are marked for writes, so
    the file is in ``w``'s data dir; once the cell's mounts are gone (``gone``, or a path
    outside the data dir), the kernel names it from the data mount's own root: the
    mount point goes in front."""
    if w.data is None:
        return path
    top = w.data[0].rstrip("/")
    if gone or not (path + "/").startswith(top + "/"):
        return top + ("" if path == "/" else path)
    return path


def written_attrs(w: Watch, f: Facts, path: str, hpid: int,
                  who: tuple[int | None, str | None],
                  hashed: tuple[str, int] | None) -> dict[str, Any]:
    """The attributes of ``exec/file-written`` (docs/events.md); ``hashed``: (SHA-256,
    size hashed), None when the file was too large or could not be read."""
    return {"path": path, "hash": hashed[0] if hashed else None,
            "size": hashed[1] if hashed else f.size, "source": data_source(w, path),
            "pid": who[0], "hpid": hpid, "comm": who[1]}


def denial_attrs(owner: Watch | None, p: Pending, v: Verdict, obs: Observed,
                 who: tuple[int | None, str | None]) -> dict[str, Any]:
    """The attributes of ``exec/exec-denied`` (docs/events.md): ``source`` names the data
    directory's image when the file lies in the cell's data dir."""
    pid, comm = who
    source = data_source(owner, obs.path)
    attrs: dict[str, Any] = {"path": obs.path, "hash": obs.digest, "size": obs.size,
                             "pid": pid, "hpid": p.event.pid, "comm": comm,
                             "reason": v.reason, "op": "exec", "source": source}
    if v.signature is not None:
        attrs["signature"] = v.signature
    return attrs
