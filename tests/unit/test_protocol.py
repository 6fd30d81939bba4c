from __future__ import annotations

import math
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.errors import AgentError, ProtocolError
from agent.core.protocol import (
    MAX_DEPTH,
    MAX_FRAME,
    MAX_ITEMS,
    MAX_REQUEST_ITEMS,
    Request,
    RequestError,
    decode_reply,
    decode_request,
    encode_error,
    encode_reply,
    encode_request,
    plain,
)


def req(**fields: Any) -> bytes:
    return cbor2.dumps(fields)


def code_of(frame: bytes) -> tuple[str, int]:
    with pytest.raises(RequestError) as info:
        decode_request(frame)
    return info.value.code, info.value.request_id


# ------------------------------------------------------------------ requests

def test_minimal_request_defaults_args() -> None:
    r = decode_request(req(v=1, id=3, op="ping"))
    assert r == Request(3, "ping", {})


def test_request_round_trip() -> None:
    frame = encode_request(42, "cell.create", {"name": "tv", "mem": 2**40, "l": [1, "x"]})
    r = decode_request(frame)
    assert (r.id, r.op, dict(r.args)) == (42, "cell.create",
                                          {"name": "tv", "mem": 2**40, "l": [1, "x"]})


@pytest.mark.parametrize(("fields", "code", "rid"), [
    ({"id": 1, "op": "ping"}, "E_SHAPE", 1),                      # no version
    ({"v": "1", "id": 1, "op": "ping"}, "E_SHAPE", 1),
    ({"v": 2, "id": 5, "op": "ping"}, "E_VERSION", 5),
    ({"v": 2, "id": 5, "op": "ping", "new": 1}, "E_VERSION", 5),  # version checked first
    ({"v": 1, "op": "ping"}, "E_SHAPE", 0),
    ({"v": 1, "id": -1, "op": "ping"}, "E_SHAPE", 0),
    ({"v": 1, "id": True, "op": "ping"}, "E_SHAPE", 0),
    ({"v": 1, "id": "7", "op": "ping"}, "E_SHAPE", 0),
    ({"v": 1, "id": 7, "op": 5}, "E_SHAPE", 7),
    ({"v": 1, "id": 7, "op": "Ping"}, "E_SHAPE", 7),
    ({"v": 1, "id": 7, "op": "a" * 65}, "E_SHAPE", 7),
    ({"v": 1, "id": 7, "op": "ping; rm"}, "E_SHAPE", 7),
    ({"v": 1, "id": 7, "op": "ping", "args": [1]}, "E_SHAPE", 7),
    ({"v": 1, "id": 7, "op": "ping", "args": None}, "E_SHAPE", 7),
    ({"v": 1, "id": 7, "op": "ping", "args": {1: 2}}, "E_SHAPE", 7),
    ({"v": 1, "id": 7, "op": "ping", "uid": 0}, "E_SHAPE", 7),    # unknown key
])
def test_bad_requests(fields: dict[str, Any], code: str, rid: int) -> None:
    assert code_of(req(**fields)) == (code, rid)


def test_not_a_map() -> None:
    assert code_of(cbor2.dumps([1, 2]))[0] == "E_SHAPE"
    assert code_of(cbor2.dumps("ping"))[0] == "E_SHAPE"


@pytest.mark.parametrize("frame", [
    b"",
    b"\xff",                                   # break outside indefinite item
    b"\x1c",                                   # reserved additional info
    b"\xa1\x61v",                              # truncated map
    b"\x9b" + b"\xff" * 8,                     # array claiming 2**64-1 items
    b"\x5a\xff\xff\xff\xff",                   # byte string claiming 4 GiB
    b"\x9f\x01\xff",                           # indefinite array
    b"\xc1\x1a\x00\x00\x00\x00",               # tag 1 (datetime)
    b"\xd8\x23\x61a",                          # tag 35 (regex)
    b"\xd8\x1c\x80",                           # tag 28 (shareable)
    b"\xf7",                                   # undefined
    b"\xf0",                                   # simple value 16
    b"\xf8\x20",                               # simple value 32
    b"\x62\xff\xfe",                           # invalid UTF-8
    b"\xa1\x81\x01\x02",                       # array as a map key
    b"\xa1\xf5\x01",                           # bool as a map key
    b"\xa2\x61a\x01\x61a\x02",                 # duplicate key
    cbor2.dumps({"v": 1, "id": 1, "op": "ping"}) + b"\x00",  # trailing garbage
])
def test_malformed_cbor(frame: bytes) -> None:
    assert code_of(frame)[0] == "E_CBOR"


def test_nesting_limit_without_recursion() -> None:
    deep = b"\x81" * 50_000 + b"\x00"
    assert code_of(deep)[0] == "E_CBOR"
    ok = cbor2.dumps({"v": 1, "id": 1, "op": "x", "args": {"a": _nest(MAX_DEPTH - 2)}})
    decode_request(ok)
    too_deep = cbor2.dumps({"v": 1, "id": 1, "op": "x", "args": {"a": _nest(MAX_DEPTH - 1)}})
    assert code_of(too_deep)[0] == "E_CBOR"


def _nest(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def test_item_limit() -> None:
    # 11 items besides the list elements: the map, 3 keys + 3 values, "args", its map,
    # "a" and the array itself.
    n = MAX_REQUEST_ITEMS - 11
    ok = cbor2.dumps({"v": 1, "id": 1, "op": "x", "args": {"a": [0] * n}})
    assert len(decode_request(ok).args["a"]) == n
    big = cbor2.dumps({"v": 1, "id": 1, "op": "x", "args": {"a": [0] * (n + 1)}})
    with pytest.raises(RequestError) as info:
        decode_request(big)
    assert info.value.code == "E_CBOR" and str(MAX_REQUEST_ITEMS) in info.value.message
    # a reply may hold more (a list of events): up to MAX_ITEMS
    # 9 items besides the list elements: the map, 4 keys, 3 values and the array.
    reply = cbor2.dumps({"v": 1, "id": 1, "ok": True, "result": [0] * (MAX_ITEMS - 9)})
    assert len(decode_reply(reply).result) == MAX_ITEMS - 9
    reply = cbor2.dumps({"v": 1, "id": 1, "ok": True, "result": [0] * (MAX_ITEMS - 8)})
    with pytest.raises(ProtocolError):
        decode_reply(reply)


def test_frame_too_big() -> None:
    frame = encode_request(1, "x", {"blob": b"\0" * MAX_FRAME})
    assert code_of(frame)[0] == "E_FRAME_TOO_BIG"


def test_half_float_and_nan_accepted() -> None:
    # {"v": 1, "id": 1, "op": "x", "args": {"h": half 1.0, "n": half NaN}}, hand-encoded
    frame = (b"\xa4\x61v\x01\x62id\x01\x62op\x61x\x64args"
             b"\xa2\x61h\xf9\x3c\x00\x61n\xf9\x7e\x00")
    r = decode_request(frame)
    assert r.args["h"] == 1.0 and math.isnan(r.args["n"])


# ------------------------------------------------------------------ replies

def test_reply_round_trips() -> None:
    r = decode_reply(encode_reply(9, {"a": [1, 2]}))
    assert (r.id, r.ok, r.result, r.more) == (9, True, {"a": [1, 2]}, False)
    r = decode_reply(encode_reply(9, 5, more=True))
    assert r.more and r.result == 5
    r = decode_reply(encode_error(3, ProtocolError("E_X", "bad", "fix it")))
    assert not r.ok and r.error == AgentError("E_X", "bad", "fix it")
    r = decode_reply(encode_error(3, AgentError("E_Y", "no hint")))
    assert r.error is not None and r.error.hint is None


@pytest.mark.parametrize("obj", [
    [1], {"v": 1, "id": 1}, {"v": 1, "id": 1, "ok": "yes"}, {"v": 1, "id": 1, "ok": False},
    {"v": 1, "id": 1, "ok": False, "error": {"code": 1}}, {"v": 1, "id": 1, "ok": True, "x": 1},
])
def test_bad_replies(obj: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_reply(cbor2.dumps(obj))
    assert info.value.code == "E_PROTOCOL"


def test_plain_conversion() -> None:
    from pathlib import Path

    assert plain({"p": Path("/a"), "t": (1, 2), "s": {3, 1}}) == {"p": "/a", "t": [1, 2],
                                                                  "s": [1, 3]}
    with pytest.raises(ValueError):
        plain(2**64)
    with pytest.raises(TypeError):
        plain(object())
    with pytest.raises(TypeError):
        plain({(1, 2): 3})
    with pytest.raises(TypeError):
        plain({True: 3})  # a bool is not a map key, even though it is an int


def test_plain_subclasses_take_the_general_path() -> None:
    import collections
    import enum

    class Color(enum.IntEnum):
        RED = 1

    class Mode(enum.StrEnum):
        FAST = "fast"

    d = collections.defaultdict(list, {"a": (Color.RED, Mode.FAST)})
    assert plain(d) == {"a": [1, "fast"]}
    assert type(plain(d)) is dict
    assert plain(collections.OrderedDict(x=frozenset({2, 1}))) == {"x": [1, 2]}
    deep: Any = 0
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ValueError):  # the depth counts scalars too
        plain(deep)
    assert plain(deep[0]) == deep[0]


# ------------------------------------------------------------------ fuzzing

scalars = (st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1)
           | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20))
trees = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=5)
    | st.dictionaries(st.text(max_size=5) | st.integers(-5, 5), kids, max_size=5),
    max_leaves=30)
tagged = st.recursive(
    scalars | st.builds(cbor2.CBORTag, st.integers(0, 2**16), scalars),
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.text(max_size=5), kids, max_size=4)
    | st.builds(cbor2.CBORTag, st.integers(0, 300), kids),
    max_leaves=20)


def _decode_or_protocol_error(frame: bytes) -> Request | None:
    try:
        return decode_request(frame)
    except ProtocolError:
        return None


@settings(max_examples=400, deadline=None)  # a loaded host is no failure
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(frame: bytes) -> None:
    _decode_or_protocol_error(frame)


@settings(max_examples=300, deadline=None)  # a loaded host is no failure
@given(st.lists(st.sampled_from([0x80, 0x81, 0x9b, 0xa1, 0xa2, 0xbf, 0x9f, 0xff, 0xc0, 0xd9,
                                 0x19, 0x3b, 0x5b, 0x7b, 0xf9, 0xfb, 0x61, 0x00, 0x01, 0xf6]),
                max_size=60))
def test_fuzz_structural_bytes(codes: list[int]) -> None:
    _decode_or_protocol_error(bytes(codes))


@settings(max_examples=300, deadline=None)  # a loaded host is no failure
@given(tagged)
def test_fuzz_random_cbor_structures(tree: Any) -> None:
    try:
        frame = cbor2.dumps(tree)
    except Exception:
        return
    _decode_or_protocol_error(frame)
    _decode_or_protocol_error(cbor2.dumps({"v": 1, "id": 1, "op": "x", "args": {"a": tree}}))


@settings(max_examples=300, deadline=None)  # a loaded host is no failure
@given(st.dictionaries(st.sampled_from(["v", "id", "op", "args", "x"]), tagged, max_size=5))
def test_fuzz_request_like_maps(obj: dict[str, Any]) -> None:
    try:
        frame = cbor2.dumps(obj)
    except Exception:
        return
    _decode_or_protocol_error(frame)


@settings(max_examples=300, deadline=None)  # a loaded host is no failure
@given(st.integers(0, 2**64 - 1),
       st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True),
       st.dictionaries(st.text(max_size=8), trees, max_size=5))
def test_valid_requests_round_trip(rid: int, op: str, args: dict[str, Any]) -> None:
    r = decode_request(encode_request(rid, op, args))
    assert (r.id, r.op, dict(r.args)) == (rid, op, args)


@settings(max_examples=200, deadline=None)  # a loaded host is no failure
@given(trees)
def test_plain_data_is_its_own_plain_form(tree: Any) -> None:
    assert plain(tree) == tree


@settings(max_examples=200, deadline=None)  # a loaded host is no failure
@given(trees)
def test_scan_agrees_with_cbor2_on_plain_data(tree: Any) -> None:
    reply = decode_reply(encode_reply(1, tree))
    assert reply.result == tree
