"""agent.monitor.net.wire: nfnetlink messages built by hand as the kernel lays them out,
parsed back; garbage never raises; the conntrack socket's BPF filter run by a small
classic-BPF interpreter.  The same parsers read the real kernel's messages in
tests/privileged/test_netmon_host.py."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.monitor.net import wire

NESTED = 0x8000


def attr(t: int, data: bytes, nested: bool = False) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), t | (NESTED if nested else 0)) + data
    return raw + b"\0" * (-len(raw) % 4)


def nlmsg(mtype: int, family: int, body: bytes, flags: int = 0, seq: int = 0) -> bytes:
    return struct.pack("=IHHII", 20 + len(body), mtype, flags, seq, 0) + \
        bytes([family, 0, 0, 0]) + body


def ct_new(src: str, dst: str, proto: int = 6, sport: int = 40000, dport: int = 8080,
           family: int = wire.AF_INET) -> bytes:
    size = 4 if family == wire.AF_INET else 16
    af = socket.AF_INET if family == wire.AF_INET else socket.AF_INET6
    ip = (attr(1 if size == 4 else 3, socket.inet_pton(af, src))
          + attr(2 if size == 4 else 4, socket.inet_pton(af, dst)))
    pr = attr(1, bytes([proto])) + attr(2, sport.to_bytes(2, "big")) + \
        attr(3, dport.to_bytes(2, "big"))
    orig = attr(1, attr(1, ip, True) + attr(2, pr, True), True)
    reply = attr(2, attr(1, ip, True), True)  # (reversed in the kernel; unused here)
    status = attr(3, (8).to_bytes(4, "big"))
    return nlmsg(wire.NFNL_SUBSYS_CTNETLINK << 8 | wire.IPCTNL_MSG_CT_NEW, family,
                 orig + reply + status, flags=0x600)


def ipv4(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr + l4


def log_msg(prefix: str, payload: bytes, family: int = wire.AF_INET, hook: int = 3,
            ethertype: int = 0x0800, mac: str | None = None, uid: int | None = None,
            vlan: int | None = None, indev: int | None = None) -> bytes:
    body = attr(wire.NFULA_PACKET_HDR, struct.pack("!HBB", ethertype, hook, 0))
    if indev is not None:
        body += attr(wire.NFULA_IFINDEX_INDEV, indev.to_bytes(4, "big"))
    if mac is not None:
        body += attr(wire.NFULA_HWADDR, struct.pack("!HH", 6, 0) + bytes.fromhex(
            mac.replace(":", "")) + b"\0\0")
    body += attr(wire.NFULA_PAYLOAD, payload) + attr(wire.NFULA_PREFIX, prefix.encode() + b"\0")
    if uid is not None:
        body += attr(wire.NFULA_UID, uid.to_bytes(4, "big")) + attr(
            wire.NFULA_GID, uid.to_bytes(4, "big"))
    if vlan is not None:
        body += attr(wire.NFULA_VLAN, attr(1, (0x8100).to_bytes(2, "big"))
                     + attr(wire.NFULA_VLAN_TCI, (0x2000 | vlan).to_bytes(2, "big")), True)
    return nlmsg(wire.NFNL_SUBSYS_ULOG << 8 | wire.NFULNL_MSG_PACKET, family, body)


def test_conntrack_new_is_read() -> None:
    (m,) = [m for _, _, m in wire.iter_messages(ct_new("10.77.1.2", "10.77.0.2"))]
    assert wire.parse_ct_new(m) == wire.CtNew(wire.AF_INET, 6, "10.77.1.2", "10.77.0.2",
                                              40000, 8080)
    ev = wire.parse_ct_new(ct_new("fe80::1", "fe80::2", 17, 5, 53, wire.AF_INET6))
    assert ev is not None and (ev.src, ev.dst, ev.proto, ev.dport) == ("fe80::1", "fe80::2",
                                                                       17, 53)
    icmp = wire.parse_ct_new(ct_new("10.77.1.2", "10.77.0.2", proto=1))
    assert icmp is not None and icmp.sport is None and icmp.dport is None
    # not a NEW event: ignored
    other = ct_new("10.77.1.2", "10.77.0.2")
    other = other[:4] + struct.pack("=H", wire.NFNL_SUBSYS_CTNETLINK << 8 | 2) + other[6:]
    assert wire.parse_ct_new(other) is None


def test_log_batch_is_read_with_every_field() -> None:
    udp = struct.pack("!HHHH", 5353, 53, 12, 0) + b"abcd"
    batch = (log_msg("agent:out", ipv4("10.77.1.2", "10.77.0.9", 17, udp), uid=101000)
             + log_msg("agent:l2:vlan:web", b"\x00\x66\x08\x06" + b"\0" * 24,
                       family=wire.AF_BRIDGE, hook=0, ethertype=0x8100,
                       mac="02:aa:bb:cc:dd:ee", vlan=101, indev=7)
             + struct.pack("=IHHII", 16, wire.NLMSG_DONE, 0, 0, 0))
    msgs = [m for _, _, m in wire.iter_messages(batch)]
    assert len(msgs) == 3
    a, b = wire.parse_log(msgs[0]), wire.parse_log(msgs[1])
    assert a is not None and b is not None and wire.parse_log(msgs[2]) is None
    assert (a.prefix, a.family, a.hook, a.uid, a.mac, a.vlan) == ("agent:out", 2, 3, 101000,
                                                                   None, None)
    assert wire.summarize(a) == wire.Packet("udp", "10.77.1.2", "10.77.0.9", 5353, 53)
    assert (b.prefix, b.mac, b.vlan, b.indev, b.ethertype) == (
        "agent:l2:vlan:web", "02:aa:bb:cc:dd:ee", 101, 7, 0x8100)


def test_summaries_and_arp() -> None:
    def rec(payload: bytes, ethertype: int = 0x0800) -> wire.LogRecord:
        return wire.LogRecord(wire.AF_BRIDGE, 0, "", ethertype, None, None, None, None, None,
                              None, payload)

    syn = struct.pack("!HHIIHHHH", 40000, 22, 0, 0, 0x5002, 0, 0, 0)
    assert wire.summarize(rec(ipv4("10.77.0.2", "10.77.0.1", 6, syn))) == wire.Packet(
        "tcp", "10.77.0.2", "10.77.0.1", 40000, 22)
    echo = bytes([8, 0, 0, 0])
    assert wire.summarize(rec(ipv4("10.77.0.2", "10.77.0.1", 1, echo))) == wire.Packet(
        "icmp", "10.77.0.2", "10.77.0.1", None, 8)
    frag = bytearray(ipv4("10.77.0.2", "10.77.0.1", 17, syn))
    frag[6:8] = (100).to_bytes(2, "big")  # a later fragment: no ports in it
    assert wire.summarize(rec(bytes(frag))) == wire.Packet("udp", "10.77.0.2", "10.77.0.1",
                                                           None, None)
    v6 = (struct.pack("!IHBB", 6 << 28, 8, 17, 64) + socket.inet_pton(socket.AF_INET6, "fe80::5")
          + socket.inet_pton(socket.AF_INET6, "ff02::1") + struct.pack("!HHHH", 547, 546, 8, 0))
    assert wire.summarize(rec(v6, 0x86DD)) == wire.Packet("udp", "fe80::5", "ff02::1", 547, 546)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + bytes.fromhex("02aabbccddee") + \
        socket.inet_aton("10.77.0.9") + b"\0" * 6 + socket.inet_aton("10.77.0.1")
    assert wire.arp_sender(rec(arp, 0x0806)) == ("02:aa:bb:cc:dd:ee", "10.77.0.9")
    assert wire.arp_sender(rec(arp[:20], 0x0806)) is None
    assert wire.summarize(rec(b"")) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 300))
def test_garbage_never_raises(data: bytes, cut: int) -> None:
    good = log_msg("agent:in", ipv4("1.2.3.4", "5.6.7.8", 6, b"\0" * 20)) + ct_new(
        "10.77.0.2", "10.77.1.2")
    for buf in (data, good[:cut], good[:cut] + data, data + good):
        for _, _, m in wire.iter_messages(buf):
            r = wire.parse_log(m)
            if r is not None:
                wire.summarize(r)
                wire.arp_sender(r)
            wire.parse_ct_new(m)
            wire.parse_ack(m)


def test_requests_and_acks() -> None:
    bind, cfg = wire.nflog_bind_requests(7707, seq=5)
    (t, flags, m), = wire.iter_messages(bind)
    assert t == wire.NFNL_SUBSYS_ULOG << 8 | wire.NFULNL_MSG_CONFIG
    assert flags == wire.NLM_F_REQUEST | wire.NLM_F_ACK
    assert int.from_bytes(m[18:20], "big") == 7707  # res_id: the group, big-endian
    assert struct.unpack_from("=I", cfg, 8)[0] == 6
    ack = struct.pack("=IHHII", 36, wire.NLMSG_ERROR, 0, 5, 0) + struct.pack("=i", -1) + \
        bind[:16]
    assert wire.parse_ack(ack) == 1
    assert wire.parse_ack(ack[:16] + struct.pack("=i", 0) + ack[20:]) == 0
    assert wire.parse_ack(bind) is None
    stats = wire.ct_stats_request(9)
    assert struct.unpack_from("=H", stats, 4)[0] == wire.NFNL_SUBSYS_CTNETLINK << 8 | 5


# -- the conntrack filter, run by a classic BPF interpreter ---------------------------------


def run_bpf(prog: list[tuple[int, int, int, int]], pkt: bytes) -> int:
    a, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x30:
            if k >= len(pkt):
                return 0
            a = pkt[k]
        elif code == 0x28:
            if k + 2 > len(pkt):
                return 0
            a = int.from_bytes(pkt[k:k + 2], "big")
        elif code == 0x20:
            if k + 4 > len(pkt):
                return 0
            a = int.from_bytes(pkt[k:k + 4], "big")
        elif code == 0x54:
            a &= k
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"opcode {code:#x}")
        pc += 1


POOL = IPv4Network("10.77.0.0/16")


def test_filter_passes_cell_to_cell_only() -> None:
    prog = wire.ct_pool_filter(POOL)
    assert len(prog) < 64 and all(0 <= jt < 256 and 0 <= jf < 256 for _, jt, jf, _ in prog)
    assert run_bpf(prog, ct_new("10.77.1.2", "10.77.0.2")) != 0
    assert run_bpf(prog, ct_new("10.77.255.254", "10.77.0.0")) != 0
    for src, dst in (("10.78.1.2", "10.77.0.2"), ("10.77.1.2", "192.168.1.1"),
                     ("127.0.0.1", "127.0.0.1"), ("192.168.1.5", "10.77.0.2")):
        assert run_bpf(prog, ct_new(src, dst)) == 0, (src, dst)
    assert run_bpf(prog, ct_new("fe80::1", "fe80::2", family=wire.AF_INET6)) == 0
    # an unexpected layout is left to Python (passed), never lost
    odd = bytearray(ct_new("192.168.1.5", "8.8.8.8"))
    odd[22:24] = struct.pack("=H", 12 | NESTED)  # first attribute not CTA_TUPLE_ORIG
    assert run_bpf(prog, bytes(odd)) != 0
    assert run_bpf(prog, b"\0" * 8) == 0  # too short: dropped by the load


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses(v=4), st.ip_addresses(v=4))
def test_filter_agrees_with_the_pool(src: object, dst: object) -> None:
    prog = wire.ct_pool_filter(POOL)
    want = src in POOL and dst in POOL  # type: ignore[operator]
    assert (run_bpf(prog, ct_new(str(src), str(dst))) != 0) == want
