"""The host channel's kernel side: uevents, the mount table, rtnetlink, sysctls.

* :func:`open_uevents`: group 1 of ``NETLINK_KOBJECT_UEVENT`` (the kernel's own uevents,
  not udev's), a :class:`agent.kernel.nlsock.McastSocket`.
* :class:`MountTable`: ``/proc/<pid>/mountinfo`` and an epoll set that holds it for
  ``EPOLLPRI``.  The kernel flags the file with ``POLLPRI | POLLERR`` when its mount
  namespace changes; asyncio's ``add_reader`` asks only for ``POLLIN`` (always set on
  this file), so the loop watches the epoll fd instead, which is readable exactly when
  the mount table changed.  :meth:`MountTable.read` drains the epoll set and reads the
  whole table (one ``seq_file`` read from the start).
* :func:`open_rtnl` / :class:`RtnlParser` / :func:`dump_rtnl`: the link, address and
  route groups of the netns, as a raw socket whose datagrams
  agent.monitor.host.rtnlwire reads (the few fields the monitor uses, with ``struct``:
  pyroute2's full decoding took about 11 ms a message on the loop in the box).  An
  ``IPRoute`` bound to the groups cannot be read from agentd's loop with pyroute2 0.9
  (its synchronous ``IPRoute`` runs an event loop of its own and refuses to start
  inside a running one); the first dump (what exists before events arrive) is an
  ``IPRoute`` in a worker thread, as every other netlink request of the agent, decoded
  by :func:`decode_rtnl` (pyroute2's messages).
* :func:`read_sysctls`: the watched values under a proc root.
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from agent.core.errors import KernelError
from agent.kernel.netlink import nl
from agent.kernel.nlsock import NETLINK_KOBJECT_UEVENT, NETLINK_ROUTE, McastSocket
from agent.monitor.host import rtnlwire
from agent.monitor.host.rtnlwire import NetMsg
from agent.monitor.host.rules import sysctl_path

__all__ = ["MountTable", "NetMsg", "RtnlParser", "decode_rtnl", "dump_rtnl", "open_rtnl",
           "open_uevents", "read_sysctls"]

UEVENT_GROUP = 1  # the kernel's uevents (2: udev's re-broadcasts)
# rtnetlink groups (linux/rtnetlink.h RTMGRP_*)
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
RTNL_GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR
               | RTMGRP_IPV6_ROUTE)
IFF_UP = 0x1
RT_TABLE_LOCAL = 255
RTN_UNICAST = 1
RTM_F_CLONED = 0x200
MAX_MOUNTINFO = 4 << 20  # bytes of mount table read at most


def open_uevents() -> McastSocket:
    return McastSocket.open(NETLINK_KOBJECT_UEVENT, UEVENT_GROUP, "kernel uevents",
                            rcvbuf=1 << 20)


def open_rtnl() -> McastSocket:
    return McastSocket.open(NETLINK_ROUTE, RTNL_GROUPS, "rtnetlink groups", rcvbuf=1 << 20)


class MountTable:
    """The mount table of ``pid``'s mount namespace (``self``: agentd's, the host's)."""

    def __init__(self, proc: Path = Path("/proc"), pid: int | str = "self") -> None:
        self.path = f"{proc}/{pid}/mountinfo"
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise KernelError.from_oserror("open", self.path, exc) from exc
        try:
            self.ep = select.epoll(1)
            self.ep.register(self.fd, select.EPOLLPRI)
        except BaseException:
            os.close(self.fd)
            raise

    def fileno(self) -> int:
        """The fd for the loop: readable when the mount table changed."""
        return self.ep.fileno()

    def read(self) -> str:
        """Drain the change notice and read the whole table."""
        self.ep.poll(0)
        chunks: list[bytes] = []
        size = 0
        try:
            os.lseek(self.fd, 0, os.SEEK_SET)
            while size < MAX_MOUNTINFO:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except OSError as exc:
            raise KernelError.from_oserror("read", self.path, exc) from exc
        return b"".join(chunks).decode("utf-8", "replace")

    def close(self) -> None:
        if self.fd >= 0:
            self.ep.close()
            os.close(self.fd)
            self.fd = -1


def decode_rtnl(msgs: Iterable[Any]) -> Iterator[NetMsg]:
    """pyroute2 messages (a dump; tests compare it with agent.monitor.host.rtnlwire) to
    :class:`NetMsg`;
    the local table, broadcast/local route types and cloned routes are left out (they
    follow addresses, which are reported themselves)."""
    for m in msgs:
        event = str(m.get("event") or "")
        new = event.startswith("RTM_NEW")
        if event in ("RTM_NEWLINK", "RTM_DELLINK"):
            if m.get("family", 0) != 0:  # AF_BRIDGE port and AF_INET6 device messages
                continue
            info = m.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            yield NetMsg("link", new, (int(m.get("index") or 0),
                                       str(m.get_attr("IFLA_IFNAME") or ""),
                                       bool(int(m.get("flags") or 0) & IFF_UP),
                                       int(m.get_attr("IFLA_MASTER") or 0), kind))
        elif event in ("RTM_NEWADDR", "RTM_DELADDR"):
            addr = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
            if addr is None:
                continue
            yield NetMsg("address", new, (int(m.get("index") or 0), int(m.get("family") or 0),
                                          str(addr), int(m.get("prefixlen") or 0)))
        elif event in ("RTM_NEWROUTE", "RTM_DELROUTE"):
            table = m.get_attr("RTA_TABLE") or m.get("table")
            if table == RT_TABLE_LOCAL or m.get("type") != RTN_UNICAST \
                    or int(m.get("flags") or 0) & RTM_F_CLONED:
                continue
            dst = m.get_attr("RTA_DST")
            gw = m.get_attr("RTA_GATEWAY")
            oif = m.get_attr("RTA_OIF")
            yield NetMsg("route", new, (int(table or 0), None if dst is None else str(dst),
                                        int(m.get("dst_len") or 0),
                                        None if gw is None else str(gw),
                                        None if oif is None else int(oif),
                                        int(m.get("family") or 0)))


class RtnlParser:
    """Datagrams of the rtnetlink socket to :class:`NetMsg`, by agent.monitor.host.rtnlwire
    (pyroute2's decoding cost about 11 ms a message on the loop in the box); ``bad``
    counts datagrams that could not be read at all."""

    def __init__(self) -> None:
        self.bad = 0

    def __call__(self, data: bytes) -> list[NetMsg]:
        try:
            return rtnlwire.parse(data)
        except Exception:  # the parser is bounded and should never raise: counted if it does
            self.bad += 1
            return []


def dump_rtnl() -> list[NetMsg]:
    """What exists now: links, then addresses, then routes (blocking: a worker thread)."""
    with nl("dump", "links, addresses and routes of the host"), IPRoute() as ipr:
        msgs = [*ipr.get_links(), *ipr.get_addr(), *ipr.get_routes(family=2),
                *ipr.get_routes(family=10)]
    return list(decode_rtnl(msgs))


def read_sysctls(names: Iterable[str], proc: Path = Path("/proc")) -> dict[str, str | None]:
    """Each sysctl's value (stripped; None when the kernel has no such sysctl now)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = (proc / sysctl_path(name)).read_text().strip()
        except OSError:
            out[name] = None
    return out
