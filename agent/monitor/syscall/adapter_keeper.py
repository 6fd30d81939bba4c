"""The listener keeper: one small process per agent that holds a copy of every cell's
seccomp listener, so trapped syscalls keep reaching a master across an agentd restart.

A listener fd is the only way to answer a cell's trapped calls; when the last copy
closes, the kernel answers every pending and future trapped call ENOSYS (fail closed,
but the cell's granted operations stop working and nothing is reported).  agentd hands
each new listener to the keeper (``PUT``), takes them all back when it starts
(``LIST``), and says when a cell is gone (``DROP``).  The keeper:

* is one process for the whole agent, started by agentd (and started again when agentd
  sees it die, with every listener handed over again); never one per cell;
* holds no other privilege: it runs as ``KEEPER_UID`` with no capabilities, is not
  dumpable (no ptrace, no core), owns no files (agentd binds its socket and passes it),
  and answers only root peers;
* drops a listener by itself once every process under its filter is gone (POLLHUP), so
  what it holds stays bounded (``MAX_HELD``).

It imports nothing but the standard library and runs as a script
(``python3 -I -S adapter_keeper.py FD``), so it starts fast and needs no site-packages.
The messages are short lines on a ``SOCK_SEQPACKET`` socket, fds as ``SCM_RIGHTS``.
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import sys
from typing import Any

__all__ = ["KEEPER_UID", "MAX_HELD", "Held", "KeeperLink", "parse", "serve"]

KEEPER_UID = 65534  # nobody: a keeper with any other privilege is a target
MAX_HELD = 4096
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)

Held = dict[str, tuple[int, int]]  # cell -> (pid 1, listener fd)


def parse(msg: bytes) -> tuple[str, str, int] | None:
    """``PUT|DROP <cell> <pid>`` or ``LIST`` -> (verb, cell, pid); None if malformed."""
    parts = msg.decode("ascii", "replace").split()
    if parts == ["LIST"]:
        return "LIST", "", 0
    if len(parts) == 3 and parts[0] in ("PUT", "DROP") and _NAME.fullmatch(parts[1]) \
            and parts[2].isdigit() and len(parts[2]) < 11:
        return parts[0], parts[1], int(parts[2])
    return None


def _peer_uid(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", raw)[1])


def _drop(held: Held, cell: str, pid: int | None = None, fd: int | None = None) -> None:
    entry = held.get(cell)
    if entry is not None and pid in (None, entry[0]) and fd in (None, entry[1]):
        os.close(held.pop(cell)[1])


def _handle(conn: socket.socket, held: Held) -> bool:
    """One message from agentd; False when the connection is done."""
    try:
        msg, fds, _flags, _addr = socket.recv_fds(conn, 256, 1)
    except OSError:
        return False
    if not msg:
        for fd in fds:
            os.close(fd)
        return False
    req = parse(msg)
    if req is None or (req[0] == "PUT") != bool(fds):
        for fd in fds:
            os.close(fd)
        return True  # ignored: agentd never sends it
    verb, cell, pid = req
    if verb == "PUT":
        _drop(held, cell)
        if len(held) >= MAX_HELD:
            os.close(fds[0])
        else:
            held[cell] = (pid, fds[0])
    elif verb == "DROP":
        _drop(held, cell, pid)
    else:
        for name, (p, fd) in sorted(held.items()):
            socket.send_fds(conn, [f"FD {name} {p}".encode()], [fd])
        conn.send(f"END {len(held)}".encode())
    return True


def _harden() -> None:
    import ctypes
    import resource

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no ptrace by the same uid, no core
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, MAX_HELD + 64), hard))


def serve(listen_fd: int) -> None:
    """Accept agentd (one connection at a time: a new agentd replaces the old one) and
    keep what it hands over, until killed.  Sleeps in poll(2) until agentd writes, a new
    agentd connects, or every process under a held filter is gone (POLLHUP)."""
    _harden()
    srv = socket.socket(fileno=listen_fd)
    held: Held = {}
    conn: socket.socket | None = None
    while True:
        poller = select.poll()
        poller.register(srv, select.POLLIN)
        if conn is not None:
            poller.register(conn, select.POLLIN)
        by_fd = {fd: cell for cell, (_pid, fd) in held.items()}
        for fd in by_fd:
            poller.register(fd, 0)  # POLLHUP only: its processes are all gone
        for fd, _events in poller.poll():
            if fd in by_fd:
                _drop(held, by_fd[fd], fd=fd)  # unless a PUT above replaced it
            elif fd == srv.fileno():
                new, _ = srv.accept()
                if _peer_uid(new) != 0:
                    new.close()
                    continue
                if conn is not None:
                    conn.close()
                conn = new
            elif conn is not None and fd == conn.fileno() and not _handle(conn, held):
                conn.close()
                conn = None


class KeeperLink:
    """agentd's side of the keeper at ``path``: find it or start it, hand listeners
    over, take them back.  Blocking calls (:meth:`open`, :meth:`take_all`) belong in a
    worker thread; :meth:`put` and :meth:`drop` never block (False: the keeper is not
    reading, treat it as dead)."""

    def __init__(self, path: str, *, uid: int = KEEPER_UID,
                 python: str = os.path.realpath(sys.executable),
                 timeout: float = 10.0) -> None:
        self.path = path
        self.uid = uid
        self.python = python
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.proc: Any = None  # the keeper this agentd started (a subprocess.Popen)

    def open(self) -> bool:
        """Connect to the running keeper (True: it may hold listeners of a previous
        agentd) or start a new one (False)."""
        self.close()
        try:
            self.sock = self._connect()
            return True
        except OSError:
            pass
        self._start()
        self.sock = self._connect()
        return False

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(self.timeout)
            s.connect(self.path)
        except OSError:
            s.close()
            raise
        return s

    def _start(self) -> None:
        import subprocess

        if os.path.lexists(self.path):
            os.unlink(self.path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            srv.bind(self.path)
            os.chmod(self.path, 0o600)  # root only: the keeper has the socket, not the path
            srv.listen(4)
            self.proc = subprocess.Popen(
                [self.python, "-I", "-S", os.path.abspath(__file__), str(srv.fileno())],
                pass_fds=[srv.fileno()], cwd="/", start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                user=self.uid, group=self.uid, extra_groups=[], umask=0o077)
        finally:
            srv.close()

    def reap(self) -> None:
        """Collect the exit of the keeper this agentd started, once it is gone."""
        if self.proc is not None and self.proc.poll() is not None:
            self.proc = None

    def take_all(self) -> list[tuple[str, int, int]]:
        """Every (cell, pid, listener fd) the keeper holds; the fds are new copies."""
        assert self.sock is not None
        self.sock.settimeout(self.timeout)
        self.sock.send(b"LIST")
        out: list[tuple[str, int, int]] = []
        try:
            while True:
                msg, fds, _flags, _addr = socket.recv_fds(self.sock, 256, 1)
                words = msg.decode("ascii", "replace").split()
                if len(words) == 3 and words[0] == "FD" and len(fds) == 1:
                    out.append((words[1], int(words[2]), fds[0]))
                    continue
                for fd in fds:
                    os.close(fd)
                if not words or words[0] == "END":
                    return out
        except BaseException:
            for _cell, _pid, fd in out:
                os.close(fd)
            raise
        finally:
            self.sock.setblocking(False)

    def _send(self, msg: bytes, fds: list[int]) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.setblocking(False)
            if fds:
                socket.send_fds(self.sock, [msg], fds)
            else:
                self.sock.send(msg)
        except OSError:
            return False
        return True

    def put(self, cell: str, pid: int, fd: int) -> bool:
        return self._send(f"PUT {cell} {pid}".encode(), [fd])

    def drop(self, cell: str, pid: int) -> bool:
        return self._send(f"DROP {cell} {pid}".encode(), [])

    def fileno(self) -> int:
        return -1 if self.sock is None else self.sock.fileno()

    def dead(self) -> bool:
        """The connection reached its end (the keeper went away)."""
        if self.sock is None:
            return True
        try:
            self.sock.setblocking(False)
            return self.sock.recv(16) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


if __name__ == "__main__":
    serve(int(sys.argv[1]))
