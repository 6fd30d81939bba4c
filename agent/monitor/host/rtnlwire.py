"""rtnetlink notifications of the host's netns, read into :class:`NetMsg` (pure).

The host monitor reads every link, address and route message of the host's netns on
agentd's loop: a cell's start makes about ten (its veth, the port's VLAN, the gateway).
pyroute2 decoded each in about 11 ms under emulation (every attribute of every message
made into objects), on the loop, while the start it reports on waited for that loop
(issue 14: the exec monitor's verdict, the next plan step).  This reads only the fields
the monitor uses, with ``struct``, in well under a millisecond; pyroute2 still makes the
dumps (agent.monitor.host.adapter.dump_rtnl), and the tests check the two agree.

Bounded by the buffer: a malformed message is skipped, never raises.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from agent.monitor.net.wire import NLMSG_HEADER, iter_messages

__all__ = ["NetMsg", "parse"]

RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE = (
    16, 17, 20, 21, 24, 25)
IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 10, 18, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
IFF_UP = 0x1
RT_TABLE_LOCAL, RTN_UNICAST, RTM_F_CLONED = 255, 1, 0x200
AF_INET, AF_INET6 = 2, 10

_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
# family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_HDR = NLMSG_HEADER.size


@dataclass(frozen=True)
class NetMsg:
    """One rtnetlink message, decoded to what :class:`agent.monitor.host.rules.NetState`
    takes: ``kind`` ``link``, ``address`` or ``route``; ``new`` (NEW) or not (DEL)."""

    kind: str
    new: bool
    args: tuple[Any, ...]


def _attrs(buf: bytes, off: int) -> dict[int, bytes]:
    """The attributes from ``off`` to the end of ``buf`` (first of each type wins)."""
    out: dict[int, bytes] = {}
    end = len(buf)
    while off + _NLA.size <= end:
        length, atype = _NLA.unpack_from(buf, off)
        if length < _NLA.size or off + length > end:
            break
        out.setdefault(atype & 0x3FFF, buf[off + _NLA.size:off + length])
        off += (length + 3) & ~3
    return out


def _text(b: bytes | None) -> str | None:
    return None if b is None else b.split(b"\0", 1)[0].decode("utf-8", "replace")


def _u32(b: bytes | None) -> int | None:
    return None if b is None or len(b) < 4 else int(_U32.unpack_from(b)[0])


def _addr(family: int, b: bytes | None) -> str | None:
    """As ``inet_ntop`` writes it (what pyroute2 and every tool show)."""
    size = {AF_INET: 4, AF_INET6: 16}.get(family)
    if b is None or size is None or len(b) < size:
        return None
    if size == 4:
        return str(IPv4Address(b[:4]))
    if b[:10] == bytes(10) and b[10:12] == b"\xff\xff":  # IPv4-mapped
        return f"::ffff:{IPv4Address(b[12:16])}"
    if b[:12] == bytes(12) and b[12:14] != bytes(2):  # IPv4-compatible, as glibc does
        return f"::{IPv4Address(b[12:16])}"
    return IPv6Address(b[:16]).compressed


def _link(msg: bytes, new: bool) -> NetMsg | None:
    if len(msg) < _HDR + _IFINFO.size:
        return None
    family, _, index, flags, _ = _IFINFO.unpack_from(msg, _HDR)
    if family != 0:  # AF_BRIDGE port and AF_INET6 device messages
        return None
    a = _attrs(msg, _HDR + _IFINFO.size)
    info = a.get(IFLA_LINKINFO)
    kind = _text(_attrs(info, 0).get(IFLA_INFO_KIND)) if info is not None else None
    return NetMsg("link", new, (index, _text(a.get(IFLA_IFNAME)) or "", bool(flags & IFF_UP),
                                _u32(a.get(IFLA_MASTER)) or 0, kind))


def _address(msg: bytes, new: bool) -> NetMsg | None:
    if len(msg) < _HDR + _IFADDR.size:
        return None
    family, prefixlen, _, _, index = _IFADDR.unpack_from(msg, _HDR)
    a = _attrs(msg, _HDR + _IFADDR.size)
    addr = _addr(family, a.get(IFA_LOCAL)) or _addr(family, a.get(IFA_ADDRESS))
    if addr is None:
        return None
    return NetMsg("address", new, (index, family, addr, prefixlen))


def _route(msg: bytes, new: bool) -> NetMsg | None:
    if len(msg) < _HDR + _RTMSG.size:
        return None
    family, dst_len, _, _, rtm_table, _, _, rtype, flags = _RTMSG.unpack_from(msg, _HDR)
    a = _attrs(msg, _HDR + _RTMSG.size)
    table = _u32(a.get(RTA_TABLE)) or rtm_table
    if table == RT_TABLE_LOCAL or rtype != RTN_UNICAST or flags & RTM_F_CLONED:
        return None
    return NetMsg("route", new, (table, _addr(family, a.get(RTA_DST)), dst_len,
                                 _addr(family, a.get(RTA_GATEWAY)), _u32(a.get(RTA_OIF)),
                                 family))


_BY_TYPE = {RTM_NEWLINK: (_link, True), RTM_DELLINK: (_link, False),
            RTM_NEWADDR: (_address, True), RTM_DELADDR: (_address, False),
            RTM_NEWROUTE: (_route, True), RTM_DELROUTE: (_route, False)}


def parse(data: bytes) -> list[NetMsg]:
    """The link, address and route messages of one datagram; the local table,
    broadcast/local route types and cloned routes are left out (they follow addresses,
    which are reported themselves), as is anything this cannot read."""
    out = []
    for mtype, _, msg in iter_messages(data):
        how = _BY_TYPE.get(mtype)
        if how is not None:
            m = how[0](msg, how[1])
            if m is not None:
                out.append(m)
    return out
