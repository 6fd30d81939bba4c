"""sock_diag messages of channel 3's listener watch, built and parsed (pure).

A ``SOCK_DIAG_BY_FAMILY`` dump of one netns's TCP sockets in state LISTEN
(include/uapi/linux/inet_diag.h: ``inet_diag_req_v2`` out, ``inet_diag_msg`` back).
Only TCP: a UDP socket has no listening state (a bound, unconnected UDP socket is a
server's or a client's alike), so UDP services are seen by their flows only.  The
parser is bounded by the buffer and returns None (never raises) on what it cannot read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from agent.monitor.net.wire import (
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HEADER,
    iter_messages,
    parse_ack,
)

__all__ = ["NETLINK_SOCK_DIAG", "Listener", "listen_dump_request", "parse_dump"]

AF_INET, AF_INET6, IPPROTO_TCP = 2, 10, 6
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_DUMP = 0x300
TCP_LISTEN = 10
_NLMSG = NLMSG_HEADER
_REQ = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states; then the 48-byte id
_SOCKID_SIZE = 48
_MSG_SIZE = 72  # inet_diag_msg


@dataclass(frozen=True)
class Listener:
    """One listening socket: its protocol, bound address and port, the owner's uid
    (as seen from agentd's user namespace) and the socket's inode."""

    proto: str
    address: str
    port: int
    uid: int
    inode: int


def listen_dump_request(family: int, seq: int) -> bytes:
    """Ask for every TCP socket of ``family`` (AF_INET or AF_INET6) in state LISTEN."""
    body = _REQ.pack(family, IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN) + bytes(_SOCKID_SIZE)
    return _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY,
                       NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse_listener(msg: bytes) -> Listener | None:
    if len(msg) < _NLMSG.size + _MSG_SIZE:
        return None
    _, mtype, _, _, _ = _NLMSG.unpack_from(msg, 0)
    if mtype != SOCK_DIAG_BY_FAMILY:
        return None
    o = _NLMSG.size
    family, state = msg[o], msg[o + 1]
    if state != TCP_LISTEN or family not in (AF_INET, AF_INET6):
        return None
    (port,) = struct.unpack_from("!H", msg, o + 4)
    raw = msg[o + 8:o + 8 + (4 if family == AF_INET else 16)]
    address = str(IPv4Address(raw) if family == AF_INET else IPv6Address(raw))
    uid, inode = struct.unpack_from("=II", msg, o + 64)
    return Listener("tcp", address, port, uid, inode)


def parse_dump(buf: bytes, seq: int) -> tuple[list[Listener], bool, int]:
    """One datagram of the dump answering request ``seq``: ``(listeners, done, errno)``;
    ``done`` once NLMSG_DONE (or an error, its errno) was read.  Messages of other
    requests are skipped."""
    out: list[Listener] = []
    for mtype, _, msg in iter_messages(buf):
        if struct.unpack_from("=I", msg, 8)[0] != seq:
            continue
        if mtype == NLMSG_DONE:
            return out, True, 0
        if mtype == NLMSG_ERROR:
            return out, True, parse_ack(msg) or 0
        listener = parse_listener(msg)
        if listener is not None:
            out.append(listener)
    return out, False, 0
