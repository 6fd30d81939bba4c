"""The control fuzzer (bench/ctlfuzz.py, bench/fuzz.py): what it generates, what it keeps
away from, and a short run against a real agentd on the host (the long one is
``bench/run fuzz`` in the box)."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import cbor2
import pytest
from test_control import start_daemon

from agent.core.protocol import MAX_FRAME, RequestError, decode_request, encode_request

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import ctlfuzz  # bench/ctlfuzz.py
import fuzz  # bench/fuzz.py
from ctlfuzz import Gen, Indef, Pairs, Simple, Tag, effect, enc, expected_id


def test_same_seed_same_messages() -> None:
    a, b = Gen(5), Gen(5)
    assert [a.one() for _ in range(300)] == [b.one() for _ in range(300)]
    assert [Gen(6).one() for _ in range(5)] != [Gen(5).one() for _ in range(5)]


def test_every_family_and_every_refusal_is_generated() -> None:
    gen = Gen(1)
    fams: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    sizes = set()
    for _ in range(3000):
        fam, frame = gen.one()
        fams[fam] += 1
        sizes.add("over" if len(frame) > MAX_FRAME else "max" if len(frame) == MAX_FRAME
                  else "empty" if not frame else "under")
        try:
            req = decode_request(frame)
            codes["ok:" + req.op] += 1
        except RequestError as exc:
            codes[exc.code] += 1
    assert set(fams) == {f for f, _ in Gen.FAMILIES}
    assert sizes == {"over", "max", "empty", "under"}
    assert {"E_CBOR", "E_SHAPE", "E_VERSION", "E_FRAME_TOO_BIG"} <= set(codes)
    assert {f"ok:{op}" for op in ctlfuzz.OPS} <= set(codes)  # every op, decodable


def test_encoder_writes_what_cbor2_would_and_what_it_would_not() -> None:
    for value in (0, 23, 24, 2**64 - 1, -1, -(2**64), 1.5, "é", b"\x00", [1, [2]],
                  {"v": 1, "op": "ps"}, None, True):
        assert enc(value) == cbor2.dumps(value), value
    assert enc(Indef(4, [1, 2])) == b"\x9f\x01\x02\xff"
    assert enc(Pairs([("a", 1), ("a", 2)])) == b"\xa2\x61a\x01\x61a\x02"
    assert enc(Tag(1, 0)) == b"\xc1\x00" and enc(Simple(255)) == b"\xf8\xff"
    for weird in (Indef(5, ["v", 1]), Pairs([("v", 1), ("v", 1)]), Tag(0, {"v": 1})):
        with pytest.raises(RequestError) as info:
            decode_request(enc(weird))
        assert info.value.code == "E_CBOR"


def test_expected_id() -> None:
    assert expected_id(encode_request(77, "ps")) == 77
    assert expected_id(cbor2.dumps({"v": 1, "id": 9, "op": 5})) == 9  # recoverable
    assert expected_id(b"\xff") == 0


@pytest.mark.parametrize(("op", "args", "want"), [
    ("run", {"name": "demo-web"}, "harmful"),  # a service: it would start
    ("run", {"name": "demo-web", "dry_run": True}, "answer"),
    ("run", {"name": "demo-web", "dry_run": 1}, "harmful"),  # not True: maybe not dry
    ("run", {"name": "fz-1"}, "answer"),  # no such service
    ("stop", {"name": "tv"}, "harmful"),
    ("stop", {"name": "fz-1"}, "answer"),
    ("stop", {"name": ["tv"]}, "answer"),  # E_ARGS
    ("pin", {"name": "tv"}, "harmful"),
    ("unpin", {"name": "tv"}, "harmful"),
    ("pin", {"name": "victim", "cpu": "1"}, "answer"),
    ("events.follow", {}, "stream"),
    ("ps", {}, "answer"),
])
def test_effect_keeps_the_fuzz_away_from_what_it_must_not_destroy(op: str, args: dict[str, object],
                                                                  want: str) -> None:
    frame = encode_request(1, op, args)
    assert effect(frame, {"tv", "victim"}, {"demo-web", "tv", "victim"}, "victim") == want
    assert effect(frame[:-1], {"tv"}, {"demo-web"}, None) == "answer"  # undecodable


def test_short_fuzz_against_a_real_agentd(tmp_path: Path) -> None:
    r = start_daemon(tmp_path)
    try:
        fig = fuzz.run(800, path=r.path, pid=os.getpid(), seed=3, connections=3, timeout=30,
                       silent=3, storm=80)
    finally:
        r.stop()
    assert fig.failures == 0, "\n".join(fig.failed)
    assert fig.messages == 800 and fig.pid_after == os.getpid()
    assert set(fig.storm) <= {"pong", "E_BUSY"} and sum(fig.storm.values()) == 80
    assert fig.codes["ok"] > 0 and fig.codes["E_CBOR"] > 0
