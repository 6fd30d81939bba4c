"""agent.monitor.net.diagwire and .listeners (pure): the sock_diag request, the dump's
parser (bounded, never raising), and the listener watch's events."""

from __future__ import annotations

import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from agent.monitor.net import diagwire
from agent.monitor.net.diagwire import Listener, listen_dump_request, parse_dump
from agent.monitor.net.listeners import ListenWatch


def diag_msg(seq: int, family: int, port: int, addr: str, uid: int, inode: int,
             state: int = 10, mtype: int = 20) -> bytes:
    raw = socket.inet_pton(family, addr).ljust(16, b"\0")
    body = struct.pack("=BBBB", family, state, 0, 0) + struct.pack("!HH", port, 0) + raw + \
        bytes(16) + struct.pack("=I", 0) + bytes(8) + struct.pack("=IIIII", 0, 0, 0, uid, inode)
    return struct.pack("=IHHII", 16 + len(body), mtype, 2, seq, 0) + body


def done(seq: int) -> bytes:
    return struct.pack("=IHHII", 20, 3, 2, seq, 0) + b"\0" * 4


def test_request_asks_for_tcp_listeners_of_one_family() -> None:
    msg = listen_dump_request(socket.AF_INET6, 7)
    length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (length, mtype, flags, seq) == (len(msg), 20, 0x301, 7) and len(msg) == 16 + 56
    assert struct.unpack_from("=BBBBI", msg, 16) == (socket.AF_INET6, 6, 0, 0, 1 << 10)


def test_dump_is_parsed_until_done_and_other_requests_are_skipped() -> None:
    buf = diag_msg(5, socket.AF_INET, 8080, "10.77.0.2", 101000, 42) + \
        diag_msg(4, socket.AF_INET, 9, "10.77.0.2", 0, 1) + \
        diag_msg(5, socket.AF_INET6, 443, "fe80::1", 0, 43) + \
        diag_msg(5, socket.AF_INET, 1, "0.0.0.0", 0, 44, state=7)  # not listening
    assert parse_dump(buf, 5) == ([Listener("tcp", "10.77.0.2", 8080, 101000, 42),
                                   Listener("tcp", "fe80::1", 443, 0, 43)], False, 0)
    assert parse_dump(done(5), 5) == ([], True, 0)
    err = struct.pack("=IHHII", 36, 2, 0, 5, 0) + struct.pack("=i", -2) + bytes(16)
    assert parse_dump(err, 5) == ([], True, 2)


@given(st.binary(max_size=400), st.integers(0, 2**32 - 1))
def test_parser_never_raises(buf: bytes, seq: int) -> None:
    parse_dump(buf, seq)
    diagwire.parse_listener(buf)


def tcp(port: int, uid: int = 0) -> Listener:
    return Listener("tcp", "0.0.0.0", port, uid, port)


def test_watch_reports_new_ports_once_and_again_after_they_close() -> None:
    w = ListenWatch()
    first = w.seen("web", [tcp(80), tcp(80), tcp(443, uid=100_033)], True, 100_000)
    assert [(e.cell, e.kind, e.attrs["port"]) for e in first] == [("web", "listen", 80),
                                                                   ("web", "listen", 443)]
    assert first[1].attrs["uid"] == 33 and first[0].attrs["uid_host"] == 0
    assert w.seen("web", [tcp(80), tcp(443)], True, 100_000) == []
    assert w.knows("web", "tcp", 80) and not w.knows("db", "tcp", 80)
    assert w.seen("web", [tcp(443)], True, None) == []  # 80 closed
    assert [e.attrs["port"] for e in w.seen("web", [tcp(80), tcp(443)], True, None)] == [80]
    # a dump cut short forgets nothing it did not see
    assert w.seen("web", [tcp(22)], False, None)[0].attrs["port"] == 22
    assert w.knows("web", "tcp", 80) and w.knows("web", "tcp", 22)
    w.forget("web")
    assert not w.knows("web", "tcp", 80)


@given(st.lists(st.lists(st.integers(1, 20), max_size=8), max_size=12))
def test_watch_reports_a_port_exactly_when_it_was_not_open_at_the_last_whole_dump(
        dumps: list[list[int]]) -> None:
    w = ListenWatch()
    before: set[int] = set()
    for ports in dumps:
        got = [e.attrs["port"] for e in w.seen("c", [tcp(p) for p in ports], True, None)]
        assert got == sorted(set(ports) - before)
        before = set(ports)
