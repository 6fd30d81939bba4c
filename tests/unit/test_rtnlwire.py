"""agent.monitor.host.rtnlwire against pyroute2's decoding of the same bytes (the
oracle), for link, address and route messages made here field by field; and any bytes
at all never make it raise.  The real kernel's messages are compared the same way in
tests/privileged/test_host_watch_host.py."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from agent.monitor.host import rtnlwire
from agent.monitor.host.adapter import decode_rtnl


def attr(atype: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), atype) + data
    return raw + bytes(-len(raw) % 4)


def msg(mtype: int, body: bytes, seq: int = 1) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, seq, 0) + body


def oracle(data: bytes) -> list[rtnlwire.NetMsg]:
    return list(decode_rtnl(MarshalRtnl().parse(data)))


names = st.from_regex(r"[a-z][a-z0-9.]{0,14}", fullmatch=True)


@st.composite
def links(draw: st.DrawFn) -> bytes:
    attrs = attr(3, draw(names).encode() + b"\0")
    if draw(st.booleans()):
        attrs += attr(10, struct.pack("=I", draw(st.integers(1, 2**31 - 1))))
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["veth", "vlan", "bridge", "dummy"]))
        attrs += attr(18, attr(1, kind.encode() + b"\0"))
    body = struct.pack("=BxHiII", draw(st.sampled_from([0, 0, 7, 10])), 1,
                       draw(st.integers(1, 2**31 - 1)), draw(st.integers(0, 2**32 - 1)), 0)
    return msg(draw(st.sampled_from([16, 17])), body + attrs)


def ip_bytes(draw: st.DrawFn, family: int) -> bytes:
    return draw(st.binary(min_size=4, max_size=4) if family == socket.AF_INET
                else st.binary(min_size=16, max_size=16))


@st.composite
def addresses(draw: st.DrawFn) -> bytes:
    family = draw(st.sampled_from([socket.AF_INET, socket.AF_INET6]))
    body = struct.pack("=BBBBI", family, draw(st.integers(0, 128)), 0, 0,
                       draw(st.integers(1, 2**31 - 1)))
    for atype in draw(st.lists(st.sampled_from([1, 2]), max_size=2, unique=True)):
        body += attr(atype, ip_bytes(draw, family))
    return msg(draw(st.sampled_from([20, 21])), body)


@st.composite
def routes(draw: st.DrawFn) -> bytes:
    family = draw(st.sampled_from([socket.AF_INET, socket.AF_INET6]))
    body = struct.pack("=BBBBBBBBI", family, draw(st.integers(0, 128)), 0, 0,
                       draw(st.sampled_from([254, 255, 0, 100])), 3, 0,
                       draw(st.sampled_from([1, 1, 2, 3])),
                       draw(st.sampled_from([0, 0x200])))
    if draw(st.booleans()):
        body += attr(15, struct.pack("=I", draw(st.sampled_from([254, 255, 1000]))))
    for atype in draw(st.lists(st.sampled_from([1, 5]), max_size=2, unique=True)):
        body += attr(atype, ip_bytes(draw, family))
    if draw(st.booleans()):
        body += attr(4, struct.pack("=I", draw(st.integers(1, 2**31 - 1))))
    return msg(draw(st.sampled_from([24, 25])), body)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(links(), addresses(), routes()), min_size=1, max_size=4))
def test_the_fields_agree_with_pyroute2(msgs: list[bytes]) -> None:
    data = b"".join(msgs)
    got = rtnlwire.parse(data)
    assert got == oracle(data)
    assert all(m.kind in ("link", "address", "route") for m in got)


def test_a_real_shape_control() -> None:
    """A veth being added, as the kernel sends it: the control that the oracle sees one."""
    body = struct.pack("=BxHiII", 0, 1, 42, 1, 0) + attr(3, b"vc-abc\0") + \
        attr(10, struct.pack("=I", 7)) + attr(18, attr(1, b"veth\0"))
    (m,) = rtnlwire.parse(msg(16, body))
    assert m == rtnlwire.NetMsg("link", True, (42, "vc-abc", True, 7, "veth"))
    assert oracle(msg(16, body)) == [m]


@pytest.mark.parametrize("addr", ["::ffff:1.2.3.4", "::1.2.3.4", "::1", "::", "fe80::1",
                                  "1:0:0:1:0:0:0:1", "1::1:0:0:0:1", "::1:2:3:4:5:6",
                                  "2001:db8::ff00:42:8329", "0:0:0:0:1::", "10.77.0.1"])
def test_addresses_are_written_as_inet_ntop_writes_them(addr: str) -> None:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    raw = socket.inet_pton(family, addr)
    body = struct.pack("=BBBBI", family, 64, 0, 0, 3) + attr(2, raw)
    (m,) = rtnlwire.parse(msg(20, body))
    assert m.args[2] == socket.inet_ntop(family, raw) == oracle(msg(20, body))[0].args[2]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 40))
def test_any_bytes_are_read_or_skipped_never_raised(junk: bytes, cut: int) -> None:
    rtnlwire.parse(junk)
    good = msg(16, struct.pack("=BxHiII", 0, 1, 3, 0, 0) + attr(3, b"eth0\0"))
    rtnlwire.parse(good[:cut] + junk)
    rtnlwire.parse(msg(16, junk))
    rtnlwire.parse(msg(20, junk))
    rtnlwire.parse(msg(24, junk))
