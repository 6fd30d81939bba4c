"""Layer-2 and layer-3 abuse sent from inside a cell's netns, and its controls.

A standalone script (standard library only), run as root in a cell's network namespace
(``nsenter --net=/run/netns/cell-X python3 netattack.py ...`` in the box,
``ip netns exec NS python3 tests/guest/netattack.py ...`` on the host): root there is
the strongest attacker a cell's netns can hold, able to write any frame with a packet
socket, bypassing the cell's own nftables table.  What stops these frames is the host's
bridge table (agent.core.l2fw), which no cell can touch.

    netattack.py --mac M --ip A --ll L --gw G --gwmac GM [--peer-ip P --peer-mac PM] KIND...

Each KIND sends one frame (or a few) on eth0 and prints ``sent KIND`` (``refused KIND``
when the netns's own output hook refused a packet sent through the IP stack):

=============  ============================================================================
own-arp        ARP request for the gateway, sender = the cell's MAC and IP (control)
own-ip         UDP to the gateway's port 9 from the cell's own MAC and IP (control)
own-bcast      a UDP broadcast on the cell's VLAN from its own MAC and IP (control)
mac            ARP request from a MAC that is not the cell's
arp-ip         ARP reply claiming the peer's IP (or the gateway's) at the cell's MAC
arp-mac        ARP request whose sender MAC is the peer's, on a frame from the cell's MAC
vlan           an 802.1Q-tagged frame for another VLAN (``--hop-vlan``)
qinq           a double-tagged frame: outer tag the cell's own VLAN (``--vlan``), inner
               tag the VLAN to hop to (``--hop-vlan``)
dhcp           a DHCP offer (UDP 67 -> 68) from the cell's own address
ra             an ICMPv6 router advertisement from the cell's link-local address
ip             UDP to the gateway with the peer's IPv4 source
ip6            UDP to the gateway's link-local with a forged IPv6 source
ip6-unspec     UDP from "::" (only ICMPv6 may use the unspecified source)
ipx            a broadcast IPX frame (an ethertype a cell has no business sending)
stp            an 802.3/LLC spanning-tree BPDU (no ethertype at all)
rawip          UDP with the peer's IPv4 source through a raw IP socket: it passes the
               netns's output hook, so the cell's own table sees it (an unprivileged
               process cannot forge IPv4 at all: IP_FREEBIND binds but the route
               lookup refuses a source that is not local)
freebind6      UDP from a forged IPv6 source through an ordinary socket (IPV6_FREEBIND):
               what any process in a cell can do; the cell's own table stops it
=============  ============================================================================
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys

ETH_P_ALL = 0x0003
IPV6_FREEBIND = 78


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def eth(dst: str, src: str, ethertype: int, payload: bytes, tags: tuple[int, ...] = ()) -> bytes:
    out = mac_bytes(dst) + mac_bytes(src)
    for vid in tags:
        out += struct.pack("!HH", 0x8100, vid)
    frame = out + struct.pack("!H", ethertype) + payload
    return frame + b"\0" * max(0, 60 - len(frame))


def arp(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    return (struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac_bytes(sha) + socket.inet_aton(spa)
            + mac_bytes(tha) + socket.inet_aton(tpa))


def ipv4_udp(src: str, dst: str, sport: int, dport: int, data: bytes = b"netattack") -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x1234, 0, 64, 17, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + udp


def ipv6(src: str, dst: str, nxt: int, payload: bytes, hops: int = 64) -> bytes:
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    if nxt in (17, 58):  # checksum over the pseudo-header
        pseudo = s + d + struct.pack("!IxxxB", len(payload), nxt)
        off = 6 if nxt == 17 else 2
        c = csum(pseudo + payload)
        payload = payload[:off] + struct.pack("!H", c) + payload[off + 2:]
    return struct.pack("!IHBB", 6 << 28, len(payload), nxt, hops) + s + d + payload


def frames(a: argparse.Namespace, kind: str) -> list[bytes]:
    bc, me, gwm = "ff:ff:ff:ff:ff:ff", a.mac, a.gwmac
    zero = "00:00:00:00:00:00"
    if kind == "own-arp":
        return [eth(bc, me, 0x0806, arp(1, me, a.ip, zero, a.gw))]
    if kind == "own-ip":
        return [eth(gwm, me, 0x0800, ipv4_udp(a.ip, a.gw, 40000, 9))]
    if kind == "own-bcast":
        return [eth(bc, me, 0x0800, ipv4_udp(a.ip, "255.255.255.255", 40000, 9))]
    if kind == "mac":
        return [eth(bc, "02:00:00:00:be:ef", 0x0806, arp(1, "02:00:00:00:be:ef", a.ip, zero,
                                                          a.gw))]
    if kind == "arp-ip":
        return [eth(gwm, me, 0x0806, arp(2, me, a.peer_ip or a.gw, gwm, a.gw))]
    if kind == "arp-mac":
        return [eth(bc, me, 0x0806, arp(1, a.peer_mac or "02:00:00:00:be:ef", a.ip, zero, a.gw))]
    if kind == "vlan":
        return [eth(bc, me, 0x0806, arp(1, me, a.ip, zero, a.gw), tags=(a.hop_vlan,))]
    if kind == "qinq":
        return [eth(bc, me, 0x0806, arp(1, me, a.ip, zero, a.gw), tags=(a.vlan, a.hop_vlan))]
    if kind == "dhcp":
        offer = bytes([2, 1, 6, 0]) + b"\0" * 232 + b"\x63\x82\x53\x63\x35\x01\x02\xff"
        return [eth(bc, me, 0x0800, ipv4_udp(a.ip, "255.255.255.255", 67, 68, offer))]
    if kind == "ra":
        ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
        return [eth("33:33:00:00:00:01", me, 0x86DD, ipv6(a.ll, "ff02::1", 58, ra, 255))]
    if kind == "ip":
        return [eth(gwm, me, 0x0800, ipv4_udp(a.peer_ip or "10.77.250.250", a.gw, 40000, 9))]
    if kind == "ip6":
        udp = struct.pack("!HHHH", 40000, 9, 17, 0) + b"netattack"
        return [eth(gwm, me, 0x86DD, ipv6("fe80::bad:beef", a.gwll, 17, udp))]
    if kind == "ip6-unspec":
        udp = struct.pack("!HHHH", 40000, 9, 17, 0) + b"netattack"
        return [eth(gwm, me, 0x86DD, ipv6("::", a.gwll, 17, udp))]
    if kind == "ipx":
        return [eth(bc, me, 0x8137, b"\xff\xff\x00\x1e" + b"\0" * 26)]
    if kind == "stp":
        bpdu = b"\x42\x42\x03" + b"\0" * 35
        return [eth("01:80:c2:00:00:00", me, len(bpdu), bpdu)]
    raise SystemExit(f"netattack: unknown kind {kind}")


def through_the_stack(a: argparse.Namespace, kind: str) -> None:
    if kind == "freebind6":
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        idx = socket.if_nametoindex(a.ifname)
        s.bind(("fe80::bad:beef", 0, 0, idx))
        s.sendto(b"netattack", (a.gwll, 9, 0, idx))
    else:  # rawip
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        s.sendto(ipv4_udp(a.peer_ip or "10.77.250.250", a.gw, 40000, 9), (a.gw, 0))
    s.close()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ifname", default="eth0")
    p.add_argument("--mac", required=True)
    p.add_argument("--ip", required=True)
    p.add_argument("--ll", required=True)
    p.add_argument("--gw", required=True)
    p.add_argument("--gwmac", default="ff:ff:ff:ff:ff:ff")
    p.add_argument("--gwll", default="ff02::1")
    p.add_argument("--peer-ip", default="")
    p.add_argument("--peer-mac", default="")
    p.add_argument("--vlan", type=int, default=1, help="the cell's own VLAN (qinq's outer tag)")
    p.add_argument("--hop-vlan", type=int, default=4000, help="the VLAN a tag tries to reach")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("kinds", nargs="+")
    a = p.parse_args(argv)
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    raw.bind((a.ifname, 0))
    for kind in a.kinds:
        for _ in range(a.count):
            if kind in ("rawip", "freebind6"):
                try:
                    through_the_stack(a, kind)
                except PermissionError:  # the netns's own output hook dropped it
                    print("refused", kind, flush=True)
                    break
            else:
                for f in frames(a, kind):
                    raw.send(f)
        print("sent", kind, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
