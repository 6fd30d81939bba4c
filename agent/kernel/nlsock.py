"""A raw netlink socket bound to multicast groups, read without blocking in slices.

The monitors of the host and of processes listen to kernel broadcasts: the proc connector
(``NETLINK_CONNECTOR``), kernel uevents (``NETLINK_KOBJECT_UEVENT``) and rtnetlink
(``NETLINK_ROUTE``).  :class:`McastSocket` is what they share: made non-blocking and
close-on-exec, with a large receive buffer (``SO_RCVBUFFORCE`` as root, else as much as
``SO_RCVBUF`` may), bound with a port id the kernel picks.  :meth:`McastSocket.read`
returns up to N datagrams and never blocks: the loop calls it once per wake-up, so a burst
of messages cannot hold the loop, and the socket stays readable until it is drained.  A
full receive buffer (``ENOBUFS``: the kernel dropped messages) is counted in ``lost`` and
reported to the caller, which must assume anything may have been missed.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field

from agent.core.errors import KernelError

__all__ = ["NETLINK_CONNECTOR", "NETLINK_KOBJECT_UEVENT", "NETLINK_ROUTE", "McastSocket",
           "Read"]

NETLINK_ROUTE = 0
NETLINK_KOBJECT_UEVENT = 15
NETLINK_CONNECTOR = 11
SO_RCVBUFFORCE = 33
RECV_SIZE = 65536


@dataclass(frozen=True)
class Read:
    """One slice: the datagrams read, whether the kernel dropped some since the last
    read (``overrun``), and whether more may wait (the slice was full)."""

    datagrams: list[bytes]
    overrun: bool
    more: bool


@dataclass
class McastSocket:
    sock: socket.socket
    what: str  # names the socket in errors and events
    lost: int = 0
    closed: bool = field(default=False)

    @classmethod
    def open(cls, protocol: int, groups: int, what: str, *,
             rcvbuf: int = 1 << 20, kind: int = socket.SOCK_RAW) -> McastSocket:
        """A socket of netlink ``protocol`` bound to the ``groups`` bit mask."""
        try:
            s = socket.socket(socket.AF_NETLINK, kind | socket.SOCK_NONBLOCK
                              | socket.SOCK_CLOEXEC, protocol)
        except OSError as exc:
            raise KernelError.from_oserror("socket", what, exc,
                                           "the kernel lacks this netlink family") from exc
        try:
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.bind((0, groups))
        except OSError as exc:
            s.close()
            raise KernelError.from_oserror("bind", what, exc,
                                           "listening to kernel broadcasts needs root "
                                           "(CAP_NET_ADMIN) in the initial namespaces"
                                           if exc.errno in (errno.EPERM, errno.EACCES)
                                           else None) from exc
        return cls(s, what)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as exc:
            raise KernelError.from_oserror("send", self.what, exc) from exc

    def read(self, max_datagrams: int) -> Read:
        out: list[bytes] = []
        overrun = False
        recv = self.sock.recv
        while len(out) < max_datagrams:
            try:
                out.append(recv(RECV_SIZE))
            except BlockingIOError:
                return Read(out, overrun, False)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.lost += 1
                    overrun = True
                    continue
                raise KernelError.from_oserror("recv", self.what, exc) from exc
        return Read(out, overrun, True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
