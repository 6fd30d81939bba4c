"""Fuzzing the live agentd's control socket (issues 3 and 10): malformed CBOR, wrong types,
oversized and truncated frames, unknown operations, many connections, hostile manifests,
and the structure-aware fuzz of ``bench/fuzz.py`` in its short form.

Every frame gets an error reply with a code; after each batch agentd (same pid) still
answers ``status`` and a running cell is still in ``ps`` with the same pid.
"""

from __future__ import annotations

import os
import random
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cellkit import SERVICES, agentd_pid, clean, ps, sh, start, timed_status

from agent.core.protocol import MAX_FRAME, decode_reply, encode_request

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import fuzz  # bench/fuzz.py (its long form: `bench/run fuzz`)

__all__ = ["clean"]

SOCK = "/run/agent/agentd.sock"


def connect() -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect(SOCK)
    return s


def error_reply(s: socket.socket, frame: bytes) -> dict[str, Any]:
    """Send one frame; the reply must be an error object with a code."""
    s.send(frame)
    reply = decode_reply(s.recv(MAX_FRAME + 1))
    assert not reply.ok and reply.error is not None, (frame[:40], reply)
    code = reply.error.code
    assert code.startswith("E_") and reply.error.message, reply
    return {"code": code}


@pytest.fixture
def victim(clean: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A running cell and agentd's pid: neither may change while the socket is fuzzed."""
    row = start("fuzz-victim", ["sleep", "100000"])
    state = {"pid": row["pid"], "agentd": agentd_pid()}
    yield state
    still_fine(state)


def still_fine(state: dict[str, Any]) -> None:
    timed_status()  # agentd answers (the time is printed, not asserted: a loaded host)
    sh("agentctl", "status")  # the CLI works too
    assert agentd_pid() == state["agentd"]
    row = ps()["fuzz-victim"]
    assert row["state"] == "running" and row["pid"] == state["pid"], row


def valid(op: str = "status", **args: Any) -> bytes:
    return encode_request(7, op, args or None)


def test_malformed_cbor_and_truncated_frames(victim: dict[str, Any]) -> None:
    good = valid("ps")
    frames = [b"", b"\xff", b"\x00", b"\xbf\xff", b"\x9f" * 100, b"\xa1" * 2000,
              b"\xd9\xd9\xf7" + good, good + b"\x00", b"\xfb" + b"\x00" * 3,
              b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff", b"\x7f\x61a",
              b"\xa2\x61v\x01\x61v\x01", b"\xc1\x1a\x00\x00\x00\x00",
              cbor2.dumps({"v": 1, "id": 1, "op": "status", "args": {"x": [[[[[[[[[[[]]]]]]]]]]]}}),
              cbor2.dumps([1] * 20000)]
    frames += [good[:i] for i in range(len(good))]  # every truncation
    rng = random.Random(3)
    frames += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
               for _ in range(150)]
    for _ in range(150):  # bit flips in valid frames
        g = bytearray(valid("logs", name="fuzz-victim", n=5))
        for _ in range(rng.randrange(1, 4)):
            g[rng.randrange(len(g))] ^= 1 << rng.randrange(8)
        frames.append(bytes(g))
    codes = set()
    with connect() as s:
        for f in frames:
            s.send(f)
            reply = decode_reply(s.recv(MAX_FRAME + 1))
            if reply.ok:  # a flip that still decodes to a valid request: fine
                continue
            assert reply.error is not None
            codes.add(reply.error.code)
    assert codes and all(c.startswith("E_") for c in codes), codes
    still_fine(victim)


def test_wrong_types_and_unknown_ops(victim: dict[str, Any]) -> None:
    bad = [{"v": 1, "id": "x", "op": "status"}, {"v": 1, "id": -1, "op": "status"},
           {"v": 2, "id": 1, "op": "status"}, {"v": 1, "id": 1, "op": 5},
           {"v": 1, "id": 1}, {"id": 1, "op": "status"}, [1, 2, 3], "status", 42,
           {"v": 1, "id": 1, "op": "status", "args": []},
           {"v": 1, "id": 1, "op": "stop", "args": {"name": 5}},
           {"v": 1, "id": 1, "op": "stop", "args": {"name": "../../etc"}},
           {"v": 1, "id": 1, "op": "run", "args": {"name": "x" * 5000}},
           {"v": 1, "id": 1, "op": "logs", "args": {"name": "fuzz-victim", "n": -1}},
           {"v": 1, "id": 1, "op": "logs", "args": {"name": "fuzz-victim", "n": 2**70}},
           {"v": 1, "id": 1, "op": "ps", "args": {"unexpected": True}},
           {"v": 1, "id": 1, "op": "no-such-op"}, {"v": 1, "id": 1, "op": "Status"},
           {"v": 1, "id": 1, "op": "x" * 65}, {"v": 1, "id": 1, "op": ""},
           {"v": 1, "id": 1, "op": "stop", "args": {"name": "fuzz-victim", "extra": 1}},
           {"v": 1, "id": 2**64, "op": "status"}, {b"v": 1, "id": 1, "op": "status"}]
    codes: dict[str, str] = {}
    with connect() as s:
        for msg in bad:
            try:
                frame = cbor2.dumps(msg)
            except (OverflowError, ValueError):
                continue
            codes[repr(msg)[:60]] = error_reply(s, frame)["code"]
    assert len(codes) >= len(bad) - 1, codes
    still_fine(victim)  # the stop with a wrong type did not stop it


def test_oversized_frames(victim: dict[str, Any]) -> None:
    with connect() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        for size in (MAX_FRAME + 1, MAX_FRAME + 4096, 200_000):
            frame = cbor2.dumps({"v": 1, "id": 9, "op": "status", "args": {"pad": "a" * size}})
            assert error_reply(s, frame)["code"] == "E_FRAME_TOO_BIG"
        # the connection is still usable afterwards
        s.send(valid())
        assert decode_reply(s.recv(MAX_FRAME + 1)).ok
    still_fine(victim)


def test_many_connections(victim: dict[str, Any]) -> None:
    conns = []
    try:
        for _ in range(100):
            try:
                conns.append(connect())
            except OSError:
                break
        busy = 0
        for s in conns[-20:]:  # those over the limit are told so
            s.send(valid())
            reply = decode_reply(s.recv(MAX_FRAME + 1))
            busy += 0 if reply.ok else 1
        assert len(conns) >= 64
    finally:
        for s in conns:
            s.close()
    assert busy > 0  # the connection limit answered E_BUSY instead of hanging
    still_fine(victim)


def test_hostile_manifests_are_refused_with_a_code(victim: dict[str, Any]) -> None:
    hostile = {
        "fuzz-huge": '[resources]\nmemory_max = "900T"\npids_max = 99999999\n',
        "fuzz-escape": '[[writable]]\nkind = "tmpfs"\npath = "/../../etc"\nsize = "1M"\n',
        "fuzz-proc": '[[writable]]\nkind = "tmpfs"\npath = "/proc/sys"\nsize = "1M"\n',
        "fuzz-data": '[[writable]]\nkind = "data"\npath = "/data"\nsource = "../../etc"\n',
        "fuzz-types": '[resources]\ncpu_max = ["lots"]\nio_weight = "heavy"\n',
        "fuzz-unknown": '[resources]\nmemroy_max = "1M"\n[evil]\nx = 1\n',
        "fuzz-caps": '[privileges]\ncapabilities = ["CAP_SYS_ADMIN"]\n',
    }
    base = ('name = "{n}"\n[service]\ncommand = "/bin/busybox"\nargs = ["true"]\n'
            '[image]\nroot = "/usr/share/agent/images/demo"\n')
    specials = {"fuzz-cmd": base.replace('"/bin/busybox"', '"/../../usr/bin/python3"'),
                "fuzz-root": base.replace("/usr/share/agent/images/demo", "/")}
    try:
        for n, extra in hostile.items():
            (SERVICES / f"{n}.toml").write_text(base.format(n=n) + extra)
        for n, text in specials.items():
            (SERVICES / f"{n}.toml").write_text(text.format(n=n))
        for n in (*hostile, *specials):
            r = sh("agentctl", "run", n, check=False)
            assert r.returncode == 1 and "error[E_" in r.stderr, (n, r.stderr)
            assert "Traceback" not in r.stderr
        assert not set(ps()) - {"fuzz-victim"}
    finally:
        for n in (*hostile, *specials):
            (SERVICES / f"{n}.toml").unlink(missing_ok=True)
    still_fine(victim)


def test_structure_aware_fuzz_short_form(victim: dict[str, Any]) -> None:
    """bench/fuzz.py's messages (every family, seeded), over 4 connections, while 6
    connections never read their replies, then a storm of 100 connections: each message
    answered in time with the right id and an E_ code that is not E_INTERNAL, the storm
    answered (pong or E_BUSY), agentd the same process, its RSS flat."""
    count = int(os.environ.get("AGENT_FUZZ_N", "3000"))
    seed = int(os.environ.get("AGENT_FUZZ_SEED", "10"))
    services = {f.stem for f in SERVICES.glob("*.toml")}
    fig = fuzz.run(count, pid=agentd_pid(), seed=seed, connections=4, timeout=60,
                   cells=set(ps()), services=services, victim="fuzz-victim")
    fuzz.print_figures(fig, seed, 4)
    assert fig.failures == 0, "\n".join(fig.failed)
    assert fig.messages == count and fig.pid_after == fig.pid_before == victim["agentd"]
    assert set(fig.storm) <= {"pong", "E_BUSY"} and sum(fig.storm.values()) == 100
    assert {"valid", "args", "shape", "cbor", "bytes", "random"} <= set(fig.families)
    assert {"ok", "E_CBOR", "E_SHAPE", "E_ARGS", "E_UNKNOWN_OP"} <= set(fig.codes)
    # RSS from the first tenth on (allocator and caches warm): no growth with the count
    growth = fig.rss_kib[-1] - fig.rss_kib[1]
    assert growth < 2048, f"agentd RSS grew {growth} KiB: {fig.rss_kib}"
