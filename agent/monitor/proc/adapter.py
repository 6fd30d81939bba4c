"""The process channel's kernel side: the proc connector's socket, and what it reads of a
live process from ``/proc`` under a root.

:class:`ProcReader` implements :class:`agent.monitor.proc.rules.Lookup` for the tracker and
reads the rows of ``agentctl ps --tree``.  Each read is one ``open``/``read``/``close`` of
a small file (``status`` is parsed for four fields only, by search, not line by line: this
runs for every fork and exec in a cell); a process that is gone is None, never an error.
Which cell holds a pid is the cgroup backend's answer (``pid_to_cell``: v1 or v2).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from agent.core.errors import KernelError
from agent.kernel.nlsock import NETLINK_CONNECTOR, McastSocket
from agent.monitor.proc.rules import CN_IDX_PROC, Info, ack_of, listen_message, map_id

__all__ = ["ProcReader", "close_connector", "open_connector", "read_small"]

_GONE = (FileNotFoundError, ProcessLookupError)


def read_small(path: str, size: int = 4096) -> bytes | None:
    """One read of a small ``/proc`` file; None when the process (or the file) is gone
    or cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def _field(text: bytes, key: bytes) -> bytes | None:
    """The value of ``Key:`` in a ``/proc/PID/status`` text."""
    at = text.find(b"\n" + key + b":")
    if at < 0:
        return None
    start = at + len(key) + 2
    end = text.find(b"\n", start)
    return text[start:end if end >= 0 else len(text)].strip()


class ProcReader:
    """Reads of ``<proc>/PID/...``; ``cell_of`` is the cgroup backend's ``pid_to_cell``."""

    def __init__(self, cell_of: Callable[[int], str | None], proc: Path = Path("/proc")) -> None:
        self._cell_of = cell_of
        self.proc = str(proc)

    def cell_of(self, hpid: int) -> str | None:
        try:
            return self._cell_of(hpid)
        except (OSError, KernelError):  # unreadable: not attributable, never fatal
            return None

    def _status(self, hpid: int) -> bytes | None:
        return read_small(f"{self.proc}/{hpid}/status", 8192)

    def nspid(self, hpid: int) -> int | None:
        text = self._status(hpid)
        return None if text is None else _last_int(_field(text, b"NSpid"))

    def describe(self, hpid: int) -> Info | None:
        text = self._status(hpid)
        if text is None:
            return None
        uids = (_field(text, b"Uid") or b"").split()
        name = _field(text, b"Name")
        if name is None and text.startswith(b"Name:"):
            name = text[5:text.find(b"\n")].strip()
        try:
            exe = os.readlink(f"{self.proc}/{hpid}/exe")
        except OSError:
            exe = ""  # a kernel thread, or gone meanwhile
        return Info(nspid=_last_int(_field(text, b"NSpid")),
                    ppid=_last_int(_field(text, b"PPid")) or 0,
                    comm=(name or b"").decode("utf-8", "replace"), exe=exe,
                    uid=int(uids[0]) if uids else -1, euid=int(uids[1]) if len(uids) > 1 else -1)

    def cell_uid(self, hpid: int, uid: int) -> int | None:
        text = read_small(f"{self.proc}/{hpid}/uid_map")
        if text is None:
            return None
        return map_id(text.decode(), uid)

    def tree_rows(self, hpids: Iterable[int], limit: int) -> tuple[list[dict[str, Any]], bool]:
        """One row per live process of ``hpids`` (at most ``limit``): ``pid`` (in the
        cell), ``hpid``, ``hppid``, ``uid``/``euid`` (in the cell), ``comm``, ``exe``;
        and whether rows were left out."""
        rows: list[dict[str, Any]] = []
        pids = sorted(set(hpids))
        for hpid in pids[:limit]:
            info = self.describe(hpid)
            if info is None:
                continue
            rows.append({"pid": info.nspid, "hpid": hpid, "hppid": info.ppid,
                         "uid": self.cell_uid(hpid, info.uid),
                         "euid": self.cell_uid(hpid, info.euid),
                         "comm": info.comm, "exe": info.exe})
        return rows, len(pids) > limit


def _last_int(value: bytes | None) -> int | None:
    if not value:
        return None
    try:
        return int(value.split()[-1])
    except ValueError:
        return None



def open_connector(ack_timeout: float = 2.0) -> McastSocket:
    """The proc connector's socket, its events switched on (blocks up to ``ack_timeout``
    for the kernel's answer: call it off the loop).  KernelError when the kernel refuses
    (not root: ``EPERM``), lacks the connector, or does not answer (agentd outside the
    initial user and pid namespaces: the kernel ignores such listeners)."""
    sock = McastSocket.open(NETLINK_CONNECTOR, 1 << (CN_IDX_PROC - 1), "proc connector",
                            kind=socket.SOCK_DGRAM, rcvbuf=2 << 20)
    tag = int.from_bytes(os.urandom(4), "little") >> 1
    try:
        sock.send(listen_message(True, tag))
        deadline = time.monotonic() + ack_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock.fileno()], [], [], left)[0]:
                raise KernelError("proc connector listen", "CN_IDX_PROC", errno.ETIMEDOUT,
                                  "the kernel ignores listeners outside the initial user "
                                  "and pid namespaces; CONFIG_PROC_EVENTS?")
            for data in sock.read(64).datagrams:
                err = ack_of(data, tag)
                if err:
                    raise KernelError("proc connector listen", "CN_IDX_PROC", err,
                                      "process events need CAP_NET_ADMIN")
                if err == 0:
                    return sock
    except BaseException:
        sock.close()
        raise


def close_connector(sock: McastSocket) -> None:
    """Switch the events off (the kernel counts listeners) and close the socket."""
    if sock.closed:
        return
    try:
        sock.send(listen_message(False, 0))
    except KernelError:
        pass
    sock.close()
