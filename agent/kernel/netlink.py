"""What every netlink adapter shares: failures as KernelError, attribute walks, lookups.

pyroute2 raises ``NetlinkError`` (and the OS ``OSError``); :func:`nl` turns both into a
:class:`~agent.core.errors.KernelError` naming the netlink operation and the object, and
can treat "already there" / "already gone" as success so every step is idempotent.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.core.errors import KernelError

__all__ = ["EXISTS", "GONE", "LOOPBACK_INDEX", "attr", "index", "ipr_on", "nl", "require",
           "rtnl_fd"]

LOOPBACK_INDEX = 1  # lo is ifindex 1 in every network namespace
_NETLINK_ROUTE = 0

# Objects that are already in the wanted state: adding twice, deleting twice.
EXISTS = frozenset({errno.EEXIST})
GONE = frozenset({errno.ENODEV, errno.ENOENT, errno.EINVAL, errno.ESRCH})


@contextmanager
def nl(op: str, obj: str, ignore: set[int] | frozenset[int] = frozenset(),
        hint: str | None = None) -> Iterator[None]:
    """Turn pyroute2 / OS failures into KernelError("netlink <op>", obj)."""
    try:
        yield
    except NetlinkError as exc:
        if exc.code in ignore:
            return
        raise KernelError(f"netlink {op}", obj, exc.code, hint) from exc
    except OSError as exc:
        if exc.errno in ignore:
            return
        raise KernelError.from_oserror(op, obj, exc, hint) from exc


def attr(msg: Any, *path: str) -> Any:
    """Follow nested netlink attributes; None where one is missing."""
    for name in path:
        if msg is None:
            return None
        msg = msg.get_attr(name)
    return msg


def index(ipr: Any, ifname: str) -> int | None:
    with nl("link lookup", ifname):
        found = list(ipr.link_lookup(ifname=ifname))
    return int(found[0]) if found else None


def require(ipr: Any, ifname: str, what: str) -> int:
    idx = index(ipr, ifname)
    if idx is None:
        raise KernelError("netlink link get", f"{what} {ifname}", errno.ENODEV)
    return idx


def rtnl_fd() -> int:
    """A new rtnetlink socket in the calling thread's netns, as a bare fd."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE).detach()


def ipr_on(fd: int) -> Any:
    """An ``IPRoute`` over the rtnetlink socket ``fd`` (closed if that fails)."""
    try:
        return IPRoute(fileno=fd)
    except BaseException:
        os.close(fd)
        raise
