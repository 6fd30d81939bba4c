"""nfnetlink messages of channel 3, built and parsed (pure: bytes in, records out).

Two kinds arrive on agentd's NETLINK_NETFILTER sockets (agent.monitor.net.adapter):

* conntrack ``IPCTNL_MSG_CT_NEW`` events (group ``NFNLGRP_CONNTRACK_NEW``): one
  message per new connection the host's conntrack confirmed, i.e. let through;
  :func:`parse_ct_new` keeps the original direction's addresses, protocol and ports;
* NFLOG ``NFULNL_MSG_PACKET`` messages (several per datagram): one per packet an agent
  log rule reported; :func:`parse_log` keeps the prefix, the hook, the input device,
  the source MAC, the uid of a local socket, the VLAN tag and the packet's first bytes,
  which :func:`summarize` and :func:`arp_sender` read.

The requests agentd sends (bind an NFLOG group, ask conntrack for its statistics so the
kernel loads ``nf_conntrack_netlink`` before we listen) are built here too, as is the
classic BPF filter that lets only events between two addresses of the cell pool reach
agentd (:func:`ct_pool_filter`).  Attribute layouts follow include/uapi/linux/netfilter/
``nfnetlink_log.h``, ``nfnetlink_conntrack.h``; every parser is bounded by the buffer
and returns None (never raises) on a message it cannot read.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address

__all__ = [
    "AF_BRIDGE",
    "NLMSG_HEADER",
    "CtNew",
    "LogRecord",
    "Packet",
    "arp_sender",
    "ct_pool_filter",
    "ct_stats_request",
    "iter_messages",
    "nflog_bind_requests",
    "nflog_unbind_request",
    "parse_ack",
    "parse_ct_new",
    "parse_log",
    "summarize",
]

NETLINK_NETFILTER = 12
NFNLGRP_CONNTRACK_NEW = 1
AF_INET, AF_INET6, AF_BRIDGE = 2, 10, 7
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

NFNL_SUBSYS_CTNETLINK = 1
NFNL_SUBSYS_ULOG = 4
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET_STATS = 5
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1

# conntrack attributes
CTA_TUPLE_ORIG, CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
# NFLOG attributes
NFULA_PACKET_HDR, NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV = 1, 4, 5
NFULA_HWADDR, NFULA_PAYLOAD, NFULA_PREFIX, NFULA_UID, NFULA_GID = 8, 9, 10, 11, 14
NFULA_VLAN, NFULA_VLAN_TCI = 20, 2
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_NLBUFSIZ = 1, 2, 3
NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 4, 5
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 2

ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
PROTOS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 136: "udplite"}
_PORTED = {6, 17, 132, 136}

_NLMSG = struct.Struct("=IHHII")
NLMSG_HEADER = _NLMSG  # (sock_diag messages have the same header: diagwire)
_NFGEN = struct.Struct("=BBH")  # res_id is big-endian: packed by hand
_NLA = struct.Struct("=HH")


# -- reading -----------------------------------------------------------------------------


def iter_messages(buf: bytes) -> Iterator[tuple[int, int, bytes]]:
    """``(type, flags, message)`` for each netlink message in one datagram; ``message``
    starts at the netlink header.  A truncated message ends the iteration."""
    off, n = 0, len(buf)
    while off + _NLMSG.size <= n:
        length, mtype, flags, _, _ = _NLMSG.unpack_from(buf, off)
        if length < _NLMSG.size or off + length > n:
            return
        yield mtype, flags, buf[off:off + length]
        off += (length + 3) & ~3


def _attrs(buf: bytes, off: int, end: int) -> dict[int, tuple[int, int]]:
    """``{type: (start, end)}`` of the attributes in ``buf[off:end]`` (first one wins)."""
    out: dict[int, tuple[int, int]] = {}
    end = min(end, len(buf))
    while off + _NLA.size <= end:
        length, atype = _NLA.unpack_from(buf, off)
        if length < _NLA.size or off + length > end:
            break
        out.setdefault(atype & NLA_TYPE_MASK, (off + _NLA.size, off + length))
        off += (length + 3) & ~3
    return out


def _be(buf: bytes, span: tuple[int, int] | None, size: int) -> int | None:
    if span is None or span[1] - span[0] < size:
        return None
    return int.from_bytes(buf[span[0]:span[0] + size], "big")


def parse_ack(msg: bytes) -> int | None:
    """The errno of an NLMSG_ERROR message (0: an ack), None for other messages."""
    if len(msg) < _NLMSG.size + 4:
        return None
    _, mtype, _, _, _ = _NLMSG.unpack_from(msg, 0)
    if mtype != NLMSG_ERROR:
        return None
    err: int = struct.unpack_from("=i", msg, _NLMSG.size)[0]
    return -err


@dataclass(frozen=True)
class CtNew:
    """A new connection, original direction."""

    family: int
    proto: int
    src: str
    dst: str
    sport: int | None
    dport: int | None


def parse_ct_new(msg: bytes) -> CtNew | None:
    if len(msg) < _NLMSG.size + _NFGEN.size:
        return None
    _, mtype, _, _, _ = _NLMSG.unpack_from(msg, 0)
    if mtype != (NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW):
        return None
    family = msg[_NLMSG.size]
    top = _attrs(msg, _NLMSG.size + _NFGEN.size, len(msg))
    orig = top.get(CTA_TUPLE_ORIG)
    if orig is None:
        return None
    tup = _attrs(msg, *orig)
    ip, proto = tup.get(CTA_TUPLE_IP), tup.get(CTA_TUPLE_PROTO)
    if ip is None or proto is None:
        return None
    ips = _attrs(msg, *ip)
    if family == AF_INET:
        s, d = ips.get(CTA_IP_V4_SRC), ips.get(CTA_IP_V4_DST)
        size = 4
    elif family == AF_INET6:
        s, d = ips.get(CTA_IP_V6_SRC), ips.get(CTA_IP_V6_DST)
        size = 16
    else:
        return None
    cls = IPv4Address if size == 4 else IPv6Address
    src, dst = _be(msg, s, size), _be(msg, d, size)
    pro = _attrs(msg, *proto)
    num = _be(msg, pro.get(CTA_PROTO_NUM), 1)
    if src is None or dst is None or num is None:
        return None
    ported = num in _PORTED
    return CtNew(family, num, str(cls(src)), str(cls(dst)),
                 _be(msg, pro.get(CTA_PROTO_SRC_PORT), 2) if ported else None,
                 _be(msg, pro.get(CTA_PROTO_DST_PORT), 2) if ported else None)


@dataclass(frozen=True)
class LogRecord:
    """One packet an NFLOG rule reported."""

    family: int  # AF_INET, AF_INET6, AF_BRIDGE (the table's family, per packet for inet)
    hook: int  # netfilter hook number (inet: 1 input, 2 forward, 3 output)
    prefix: str
    ethertype: int
    indev: int | None
    outdev: int | None
    mac: str | None  # source MAC, when the packet came in on an Ethernet device
    uid: int | None  # of the local socket that sent it (host uid), if any
    gid: int | None
    vlan: int | None  # VLAN id of a tag the kernel took off (hardware-offloaded position)
    payload: bytes  # from the network header, at most the copy range


def parse_log(msg: bytes) -> LogRecord | None:
    if len(msg) < _NLMSG.size + _NFGEN.size:
        return None
    _, mtype, _, _, _ = _NLMSG.unpack_from(msg, 0)
    if mtype != (NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET):
        return None
    family = msg[_NLMSG.size]
    a = _attrs(msg, _NLMSG.size + _NFGEN.size, len(msg))
    hdr = a.get(NFULA_PACKET_HDR)
    if hdr is None or hdr[1] - hdr[0] < 3:
        return None
    ethertype = int.from_bytes(msg[hdr[0]:hdr[0] + 2], "big")
    hook = msg[hdr[0] + 2]
    p = a.get(NFULA_PREFIX)
    prefix = msg[p[0]:p[1]].split(b"\0", 1)[0].decode(errors="replace") if p else ""
    mac = None
    hw = a.get(NFULA_HWADDR)
    if hw is not None and hw[1] - hw[0] >= 10:
        hlen = int.from_bytes(msg[hw[0]:hw[0] + 2], "big")
        if hlen == 6:
            mac = ":".join(f"{b:02x}" for b in msg[hw[0] + 4:hw[0] + 10])
    vlan = None
    v = a.get(NFULA_VLAN)
    if v is not None:
        tci = _be(msg, _attrs(msg, *v).get(NFULA_VLAN_TCI), 2)
        vlan = tci & 0x0FFF if tci is not None else None
    pl = a.get(NFULA_PAYLOAD)
    return LogRecord(family, hook, prefix, ethertype, _be(msg, a.get(NFULA_IFINDEX_INDEV), 4),
                     _be(msg, a.get(NFULA_IFINDEX_OUTDEV), 4), mac,
                     _be(msg, a.get(NFULA_UID), 4), _be(msg, a.get(NFULA_GID), 4), vlan,
                     bytes(msg[pl[0]:pl[1]]) if pl else b"")


@dataclass(frozen=True)
class Packet:
    """What a logged IP packet was: protocol name, addresses and ports (None: no ports)."""

    proto: str
    src: str
    dst: str
    sport: int | None
    dport: int | None


def _proto_name(num: int) -> str:
    return PROTOS.get(num, str(num))


def summarize(rec: LogRecord) -> Packet | None:
    """The IP header (and ports) of a logged packet, from its family or ethertype."""
    data = rec.payload
    version = data[0] >> 4 if data else 0
    if version == 4 and len(data) >= 20:
        ihl = (data[0] & 0x0F) * 4
        num = data[9]
        src, dst = str(IPv4Address(data[12:16])), str(IPv4Address(data[16:20]))
        frag = int.from_bytes(data[6:8], "big") & 0x1FFF
        l4 = data[ihl:] if frag == 0 and ihl >= 20 else b""
    elif version == 6 and len(data) >= 40:
        num = data[6]
        src, dst = str(IPv6Address(data[8:24])), str(IPv6Address(data[24:40]))
        l4 = data[40:]  # extension headers are not walked: ports only right after
    else:
        return None
    if num in _PORTED and len(l4) >= 4:
        return Packet(_proto_name(num), src, dst, int.from_bytes(l4[0:2], "big"),
                      int.from_bytes(l4[2:4], "big"))
    if num in (1, 58) and len(l4) >= 1:
        return Packet(_proto_name(num), src, dst, None, l4[0])  # dport: the ICMP type
    return Packet(_proto_name(num), src, dst, None, None)


def arp_sender(rec: LogRecord) -> tuple[str, str] | None:
    """``(sender MAC, sender IP)`` of a logged Ethernet/IPv4 ARP packet."""
    d = rec.payload
    if rec.ethertype != ETH_P_ARP or len(d) < 28 or d[4] != 6 or d[5] != 4:
        return None
    return ":".join(f"{b:02x}" for b in d[8:14]), str(IPv4Address(d[14:18]))


# -- requests ----------------------------------------------------------------------------


def _msg(mtype: int, flags: int, seq: int, family: int, res_id: int, body: bytes) -> bytes:
    nfgen = struct.pack("=BB", family, 0) + res_id.to_bytes(2, "big")
    return _NLMSG.pack(_NLMSG.size + len(nfgen) + len(body), mtype, flags, seq, 0) + nfgen + body


def _attr(atype: int, data: bytes) -> bytes:
    raw = _NLA.pack(_NLA.size + len(data), atype) + data
    return raw + b"\0" * (-len(raw) % 4)


def nflog_bind_requests(group: int, seq: int, copy_range: int = 128, qthresh: int = 16,
                        timeout_cs: int = 10, bufsize: int = 16384) -> list[bytes]:
    """Bind NFLOG ``group`` to the socket, then set what each message carries: the
    first ``copy_range`` bytes of the packet; a batch is sent when ``qthresh`` packets
    wait or after ``timeout_cs`` hundredths of a second.  Each request asks for an ack."""
    cfg = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG
    flags = NLM_F_REQUEST | NLM_F_ACK
    return [
        _msg(cfg, flags, seq, 0, group, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))),
        _msg(cfg, flags, seq + 1, 0, group,
             _attr(NFULA_CFG_MODE, copy_range.to_bytes(4, "big") + bytes([NFULNL_COPY_PACKET,
                                                                         0]))
             + _attr(NFULA_CFG_QTHRESH, qthresh.to_bytes(4, "big"))
             + _attr(NFULA_CFG_TIMEOUT, timeout_cs.to_bytes(4, "big"))
             + _attr(NFULA_CFG_NLBUFSIZ, bufsize.to_bytes(4, "big"))),
    ]


def nflog_unbind_request(group: int, seq: int) -> bytes:
    return _msg(NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, 0,
                group, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_UNBIND])))


def ct_stats_request(seq: int) -> bytes:
    """Conntrack's global statistics: the reply proves ``nf_conntrack_netlink`` is there
    (the request itself makes the kernel load it, which a group bind only starts)."""
    return _msg(NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET_STATS,
                NLM_F_REQUEST | NLM_F_ACK, seq, AF_INET, 0, b"")


# -- the classic BPF filter of the conntrack socket --------------------------------------

_LDB, _LDH, _LDW = 0x30, 0x28, 0x20  # BPF_LD | BPF_{B,H,W} | BPF_ABS
_JEQ, _AND, _RET = 0x15, 0x54, 0x06  # BPF_JMP|BPF_JEQ|BPF_K, BPF_ALU|BPF_AND|BPF_K, BPF_RET|K
_PASS, _DROP = 0xFFFFFFFF, 0


def _ldh_value(atype: int) -> int:
    """What a BPF half-word load (network byte order) reads for an attribute type that
    the kernel stored in host order."""
    return int.from_bytes(atype.to_bytes(2, sys.byteorder), "big")


def ct_pool_filter(pool: IPv4Network) -> list[tuple[int, int, int, int]]:
    """``(code, jt, jf, k)`` instructions: pass a conntrack IPv4 event only when both its
    original source and destination are in ``pool``; drop other IPv4 and every IPv6
    event in the kernel.  A message whose layout is not the one expected (first the
    original tuple's addresses) is passed, so Python decides: the filter can only save
    work, never lose an event the parser would keep."""
    base = _NLMSG.size + _NFGEN.size  # 20: CTA_TUPLE_ORIG
    net, mask = int(pool.network_address), int(pool.netmask)
    # (code, jump if true, jump if false, k): jumps name a label, "" is the next one
    asm: list[tuple[int, str, str, int]] = [
        (_LDB, "", "", _NLMSG.size),  # nfgenmsg.family
        (_JEQ, "", "drop", AF_INET),
        (_LDH, "", "", base + 2),
        (_JEQ, "", "pass", _ldh_value(CTA_TUPLE_ORIG | NLA_F_NESTED)),
        (_LDH, "", "", base + 6),
        (_JEQ, "", "pass", _ldh_value(CTA_TUPLE_IP | NLA_F_NESTED)),
        (_LDH, "", "", base + 10),
        (_JEQ, "", "pass", _ldh_value(CTA_IP_V4_SRC)),
        (_LDW, "", "", base + 12),
        (_AND, "", "", mask),
        (_JEQ, "", "drop", net),
        (_LDH, "", "", base + 18),
        (_JEQ, "", "pass", _ldh_value(CTA_IP_V4_DST)),
        (_LDW, "", "", base + 20),
        (_AND, "", "", mask),
        (_JEQ, "pass", "drop", net),
    ]
    labels = {"pass": len(asm), "drop": len(asm) + 1}

    def rel(i: int, label: str) -> int:
        return labels[label] - i - 1 if label else 0

    prog = [(code, rel(i, jt), rel(i, jf), k) for i, (code, jt, jf, k) in enumerate(asm)]
    return [*prog, (_RET, 0, 0, _PASS), (_RET, 0, 0, _DROP)]
