"""Channel 3's kernel sockets: conntrack events and NFLOG groups, in any netns.

Both are raw ``NETLINK_NETFILTER`` sockets read by agentd's loop (the service registers
each with ``add_reader``); :mod:`agent.monitor.net.wire` builds and parses the messages.
Why not pyroute2: it has no NFLOG at all, and its conntrack socket differs between the
versions we support (0.7: a blocking ``NetlinkSocket``; 0.9: a synchronous wrapper over
an asyncio core of its own, whose event stream cannot be read from agentd's loop) and
parses every attribute of every message generically, which costs far more than the
four fields we keep.  A raw socket is also what the classic BPF filter is attached to.

* :func:`open_conntrack`: ``IPCTNL_MSG_CT_NEW`` events of the netns, filtered in the
  kernel to connections between two addresses of the cell pool.  The conntrack
  statistics are asked for first: that request makes the kernel load
  ``nf_conntrack_netlink`` and fails clearly when it cannot.
* :func:`open_nflog`: NFLOG ``group`` of the netns (the agent's log rules,
  agent.core.netlog).  ``EBUSY``: another socket holds the group.
* :func:`open_diag`: a ``NETLINK_SOCK_DIAG`` socket of the netns, asked on demand for
  its TCP listeners (:mod:`agent.monitor.net.diagwire`).

A socket for a cell's netns is made by a short-lived thread that enters the netns (a
socket stays in the netns it was made in) and ends.  Set-up failures are
:class:`~agent.core.errors.KernelError` naming the step; after set-up the socket is
non-blocking and :meth:`NfSocket.read` never raises for what a busy kernel does
(a full receive buffer is counted as ``lost``).
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

from agent.core.errors import KernelError
from agent.kernel.netns import in_netns
from agent.monitor.net import diagwire, wire

__all__ = ["DiagSocket", "NfSocket", "open_conntrack", "open_diag", "open_nflog"]

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_ATTACH_FILTER = 26
RECV_SIZE = 65536
_SETUP_TIMEOUT = 5.0


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


@dataclass
class NfSocket:
    """One set-up netfilter netlink socket; ``what`` names it in errors and events."""

    sock: socket.socket
    what: str
    lost: int = 0  # receive-buffer overruns seen (each loses an unknown number)
    closed: bool = field(default=False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, max_datagrams: int) -> list[bytes]:
        """Up to ``max_datagrams`` waiting datagrams, without blocking."""
        out: list[bytes] = []
        while len(out) < max_datagrams:
            try:
                out.append(self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT))
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped messages: go on
                    self.lost += 1
                    continue
                raise KernelError.from_oserror("recv", self.what, exc) from exc
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


def _new_socket(netns: Path | None, proto: int = wire.NETLINK_NETFILTER) -> socket.socket:
    def make() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, proto)

    return make() if netns is None else in_netns(netns, make)


def _request(sock: socket.socket, what: str, msg: bytes, hint: str) -> None:
    """Send one request asking for an ack; read until the ack (replies before it are
    the answer, not needed here)."""
    (seq,) = struct.unpack_from("=I", msg, 8)
    sock.send(msg)
    while True:
        for _, _, m in wire.iter_messages(sock.recv(RECV_SIZE)):
            code = wire.parse_ack(m)
            if code is None or struct.unpack_from("=I", m, 8)[0] != seq:
                continue
            if code:
                raise KernelError("nfnetlink request", what, code, hint)
            return


def _setup(netns: Path | None, what: str, steps: list[tuple[bytes, str]],
           rcvbuf: int) -> socket.socket:
    try:
        sock = _new_socket(netns)
    except OSError as exc:
        raise KernelError.from_oserror("socket NETLINK_NETFILTER", what, exc) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, 0))
        sock.settimeout(_SETUP_TIMEOUT)
        for msg, hint in steps:
            _request(sock, what, msg, hint)
        return sock
    except KernelError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise KernelError.from_oserror("nfnetlink set-up", what, exc) from exc


def _attach_filter(sock: socket.socket, prog: list[tuple[int, int, int, int]]) -> None:
    arr = (_SockFilter * len(prog))(*[_SockFilter(*i) for i in prog])
    fprog = _SockFprog(len(prog), ctypes.cast(arr, ctypes.POINTER(_SockFilter)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))  # copied by the kernel


EVENTS_SYSCTL = "sys/net/netfilter/nf_conntrack_events"


def open_conntrack(pool: IPv4Network, netns: Path | None = None,
                   rcvbuf: int = 1 << 20, proc: Path = Path("/proc")) -> NfSocket:
    """New-connection events between addresses of ``pool`` in ``netns`` (None: ours).
    ``proc``: where to read ``net.netfilter.nf_conntrack_events`` (of our netns)."""
    what = f"conntrack events{f' in {netns}' if netns else ''}"
    try:
        off = netns is None and (proc / EVENTS_SYSCTL).read_text().strip() == "0"
    except OSError:
        off = False  # read after the module is loaded, below: absent now is no answer
    if off:
        raise KernelError("read", str(proc / EVENTS_SYSCTL), errno.EOPNOTSUPP,
                          "conntrack events are switched off: sysctl "
                          "net.netfilter.nf_conntrack_events=2 (or 1)")
    sock = _setup(netns, what, [(wire.ct_stats_request(1), "the kernel needs "
                                 "CONFIG_NF_CT_NETLINK (module nf_conntrack_netlink)")],
                  rcvbuf)
    try:
        _attach_filter(sock, wire.ct_pool_filter(pool))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, wire.NFNLGRP_CONNTRACK_NEW)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise KernelError.from_oserror("conntrack events join", what, exc) from exc
    return NfSocket(sock, what)


def open_nflog(group: int, netns: Path | None = None, rcvbuf: int = 1 << 18) -> NfSocket:
    """NFLOG ``group`` in ``netns`` (None: ours), messages with the packet's first bytes."""
    what = f"nflog group {group}{f' in {netns}' if netns else ''}"
    hints = ["EPERM: another socket (ulogd?) holds the group; else the kernel lacks "
             "CONFIG_NETFILTER_NETLINK_LOG (module nfnetlink_log)", "nflog configuration"]
    sock = _setup(netns, what, list(zip(wire.nflog_bind_requests(group, 1), hints,
                                        strict=True)), rcvbuf)
    sock.setblocking(False)
    return NfSocket(sock, what)


# Listeners: a dump is answered at once, by the kernel, while we read; a netns cannot make
# it wait.  Still bounded: at most this many listeners, and this long.
MAX_LISTENERS = 256
MAX_DATAGRAMS = 64
_DUMP_TIMEOUT = 1.0


@dataclass
class DiagSocket:
    """A sock_diag socket of one netns; :meth:`listeners` dumps its TCP listeners."""

    sock: socket.socket
    what: str
    seq: int = 0
    closed: bool = field(default=False)

    def listeners(self, limit: int = MAX_LISTENERS) -> tuple[list[diagwire.Listener], bool]:
        """The netns's TCP listeners (IPv4 and IPv6), at most ``limit``, and whether that
        is all of them.  Raises :class:`KernelError` if the kernel refuses, or if a dump
        runs past :data:`MAX_DATAGRAMS` datagrams (a netns with absurdly many)."""
        out: list[diagwire.Listener] = []
        whole = True
        for family in (socket.AF_INET, socket.AF_INET6):
            self.seq = self.seq % 0xFFFFFFFF + 1
            try:
                self.sock.send(diagwire.listen_dump_request(family, self.seq))
                for _ in range(MAX_DATAGRAMS):
                    got, done, err = diagwire.parse_dump(self.sock.recv(RECV_SIZE), self.seq)
                    if err and not (family == socket.AF_INET6 and err in (
                            errno.ENOENT, errno.EAFNOSUPPORT)):  # (no IPv6 in this kernel)
                        raise KernelError("sock_diag dump", self.what, err,
                                          "the kernel needs CONFIG_INET_DIAG "
                                          "(module inet_diag, tcp_diag)")
                    room = limit - len(out)
                    whole = whole and len(got) <= room
                    out += got[:room]
                    if done:
                        break
                else:
                    raise KernelError("sock_diag dump", self.what, errno.EMSGSIZE,
                                      f"more than {MAX_DATAGRAMS} datagrams of listeners")
            except OSError as exc:
                raise KernelError.from_oserror("sock_diag dump", self.what, exc) from exc
        return out, whole

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


def open_diag(netns: Path | None = None) -> DiagSocket:
    """A sock_diag socket in ``netns`` (None: ours)."""
    what = f"sock_diag{f' in {netns}' if netns else ''}"
    try:
        sock = _new_socket(netns, diagwire.NETLINK_SOCK_DIAG)
    except OSError as exc:
        raise KernelError.from_oserror("socket NETLINK_SOCK_DIAG", what, exc) from exc
    try:
        sock.bind((0, 0))
        sock.settimeout(_DUMP_TIMEOUT)
    except OSError as exc:
        sock.close()
        raise KernelError.from_oserror("sock_diag bind", what, exc) from exc
    return DiagSocket(sock, what)
