"""Control messages for fuzzing agentd (issue 10): generated from the request grammar of
docs/protocol.md, then broken at the shape, the CBOR and the byte level.

:class:`Gen` makes ``(family, frame)`` pairs, one SEQPACKET message each, from a seed
(the same seed, the same messages):

* ``valid``: a well-formed request of a known op with well-typed arguments;
* ``args``: a known op with its arguments mutated (unknown, missing, wrong types, huge,
  negative, NaN, long, hostile strings, nested);
* ``shape``: the envelope mutated (``v``, ``id``, ``op``, ``args`` missing, mistyped, extra
  keys, unknown ops, not a map);
* ``cbor``: CBOR the profile refuses: tags, indefinite lengths, duplicate keys, simple
  values, lying lengths, non-canonical heads, invalid UTF-8, deep nesting, too many items,
  trailing bytes, every float width;
* ``bytes``: a valid frame with bits flipped, bytes inserted or deleted, truncated, spliced;
* ``random``: random bytes; ``empty``: a zero-length message; ``big``: over ``MAX_FRAME``.

:func:`effect` decodes a frame as agentd would (``agent.core.protocol.decode_request``)
and says what it would do to the box, so a runner can keep the fuzz away from what it
must not destroy (the box's demo cells, a running service).
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

from agent.core.protocol import MAX_DEPTH, MAX_FRAME, MAX_ITEMS, Request, RequestError
from agent.core.protocol import decode_request as _decode

__all__ = ["OPS", "Gen", "decode", "effect", "enc", "expected_id"]

# op -> its arguments and their kinds (docs/protocol.md, agent/daemon/*api.py)
_EVENT_ARGS = {"n": "count", "cell": "name", "channel": "pattern", "kind": "pattern",
               "severity": "severity"}
OPS: dict[str, dict[str, str]] = {
    "ping": {}, "status": {}, "whoami": {}, "ps": {}, "top": {},
    "events": _EVENT_ARGS, "events.follow": _EVENT_ARGS,
    "run": {"name": "name", "dry_run": "bool"}, "stop": {"name": "name"},
    "inspect": {"name": "name"},
    "logs": {"name": "name", "n": "count", "stream": "stream", "raw": "bool"},
    "pin": {"name": "name", "cpu": "cpu", "memory": "size"}, "unpin": {"name": "name"},
}
HOSTILE_TEXT = ["", " ", "\x00", "\x1b]0;pwned\x07", "\x1b[2J\x1b[H", "a\rb", "\u202eevil",
                "\x9b31m", "\u2028", "..", "../../etc/passwd", "/", "-", "*", "[", "[!]",
                "*" * 64, "*a" * 32, "?" * 70, "x" * 65, "A", "demo-web\x00", "é", "\ud7ff",
                "ﬀ", "0", "-1", "1e309", "NaN", "inf", "64Q", "0.0001", "%", "m"]


class Tag(NamedTuple):
    tag: int
    item: Any


class Indef(NamedTuple):
    major: int  # 2 bytes, 3 text, 4 array, 5 map
    items: list[Any]
    close: bool = True


class Pairs(NamedTuple):  # a map written pair by pair: duplicate or odd keys allowed
    pairs: list[tuple[Any, Any]]


class Simple(NamedTuple):
    value: int


class Float(NamedTuple):
    value: float
    width: int  # 2, 4 or 8 bytes


class Wide(NamedTuple):  # an integer in a longer head than needed
    value: int
    width: int


class Raw(NamedTuple):
    data: bytes


class Lie(NamedTuple):  # a head claiming ``length`` items or bytes, then ``body``
    major: int
    length: int
    body: bytes


def _head(major: int, arg: int, width: int | None = None) -> bytes:
    if width is None:
        width = 0 if arg < 24 else 1 if arg < 1 << 8 else 2 if arg < 1 << 16 \
            else 4 if arg < 1 << 32 else 8
    if width == 0:
        return bytes([major << 5 | arg])
    info = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | info]) + arg.to_bytes(width, "big")


def enc(obj: Any) -> bytes:
    """CBOR for ``obj``: plain values as cbor2 would write them, the classes above as
    they say (what cbor2 will not write)."""
    if obj is None:
        return b"\xf6"
    if obj is True or obj is False:
        return b"\xf5" if obj else b"\xf4"
    if isinstance(obj, int):
        if 0 <= obj < 1 << 64:
            return _head(0, obj)
        if -(1 << 64) <= obj < 0:
            return _head(1, -1 - obj)
        mag = obj if obj >= 0 else -1 - obj
        return enc(Tag(2 if obj >= 0 else 3, mag.to_bytes((mag.bit_length() + 7) // 8, "big")))
    if isinstance(obj, float):
        return b"\xfb" + struct.pack(">d", obj)
    if isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        return _head(3, len(data)) + data
    if isinstance(obj, bytes):
        return _head(2, len(obj)) + obj
    if isinstance(obj, list):
        return _head(4, len(obj)) + b"".join(enc(x) for x in obj)
    if isinstance(obj, dict):
        return enc(Pairs(list(obj.items())))
    if isinstance(obj, Pairs):
        return _head(5, len(obj.pairs)) + b"".join(enc(k) + enc(v) for k, v in obj.pairs)
    if isinstance(obj, Tag):
        return _head(6, obj.tag) + enc(obj.item)
    if isinstance(obj, Indef):
        body = b"".join(enc(x) for x in obj.items)
        return bytes([obj.major << 5 | 31]) + body + (b"\xff" if obj.close else b"")
    if isinstance(obj, Simple):
        return bytes([0xE0 | obj.value]) if obj.value < 24 else b"\xf8" + bytes([obj.value])
    if isinstance(obj, Float):
        code, fmt = {2: (b"\xf9", ">e"), 4: (b"\xfa", ">f"), 8: (b"\xfb", ">d")}[obj.width]
        try:
            return code + struct.pack(fmt, obj.value)
        except (OverflowError, struct.error):
            return b"\xfb" + struct.pack(">d", obj.value)
    if isinstance(obj, Wide):
        return _head(0, obj.value, obj.width)
    if isinstance(obj, Raw):
        return obj.data
    if isinstance(obj, Lie):
        return _head(obj.major, obj.length) + obj.body
    raise TypeError(f"cannot encode {type(obj).__name__}")


def decode(frame: bytes) -> Request | RequestError:
    """``frame`` decoded as agentd decodes it: the request, or the error it answers."""
    if len(frame) > MAX_FRAME:
        return RequestError("E_FRAME_TOO_BIG", "too big")
    try:
        return _decode(frame)
    except RequestError as exc:
        return exc


def expected_id(frame: bytes | Request | RequestError) -> int:
    """The id agentd must put in its reply to ``frame``: the request's, or the one it can
    recover from a bad request, else 0."""
    got = decode(frame) if isinstance(frame, bytes) else frame
    return got.request_id if isinstance(got, RequestError) else got.id


def effect(frame: bytes | Request | RequestError, cells: set[str], services: set[str],
           victim: str | None) -> str:
    """What agentd would do with ``frame``: "stream" (events.follow: replies may never
    come), "harmful" (would run a service, stop a cell, or resize a cell other than the
    ``victim``), else "answer"."""
    req = decode(frame) if isinstance(frame, bytes) else frame
    if isinstance(req, RequestError):
        return "answer"
    if req.op == "events.follow":
        return "stream"
    name = req.args.get("name")
    if not isinstance(name, str):
        return "answer"
    if req.op == "run" and req.args.get("dry_run") is not True and \
            (name in services or name in cells):
        return "harmful"
    if req.op == "stop" and name in cells:
        return "harmful"
    if req.op in ("pin", "unpin") and name in cells and name != victim:
        return "harmful"
    return "answer"


class Gen:
    """Fuzz frames from ``seed``; ``names`` are cell names worth aiming at (a victim,
    ones that do not exist) besides the generated ones."""

    FAMILIES = (("valid", 8), ("args", 26), ("shape", 14), ("cbor", 20), ("bytes", 16),
                ("random", 10), ("empty", 1), ("big", 1))

    def __init__(self, seed: int, names: list[str] | None = None) -> None:
        self.rng = random.Random(seed)
        self.names = names or ["fuzz-victim", "no-such-cell"]
        self.ids = 0
        fams, weights = zip(*self.FAMILIES, strict=True)
        self._fams: list[str] = list(fams)
        self._weights: list[int] = list(weights)

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        while True:
            yield self.one()

    def one(self) -> tuple[str, bytes]:
        fam = self.rng.choices(self._fams, self._weights)[0]
        frame = getattr(self, f"_{fam}")()
        return fam, frame

    # ------------------------------------------------------------------ values
    def _id(self) -> int:
        self.ids += 1
        return self.ids

    def valid_value(self, kind: str) -> Any:
        r = self.rng
        if kind == "count":
            return r.choice([0, 1, 5, 20, 100, 1000, 10_000])
        if kind == "name":
            return r.choice([*self.names, f"fz-{r.randrange(10 ** 6)}", "demo-web"])
        if kind == "bool":
            return r.random() < 0.5
        if kind == "severity":
            return r.choice(["info", "notice", "alert"])
        if kind == "stream":
            return r.choice(["stdout", "stderr"])
        if kind == "pattern":
            return r.choice(["*", "resize*", "st?rted", "[a-m]*", "lifecycle", "x"])
        if kind == "cpu":
            return r.choice(["250m", "0.5", 1, "150%", 2000])
        return r.choice(["16M", "64MiB", 1 << 24, "1G"])  # size

    def hostile(self, depth: int = 0) -> Any:
        """Any value of any type, most of them wrong for what they are given to."""
        r = self.rng
        pick = r.randrange(16)
        if pick == 0:
            return r.choice([None, True, False])
        if pick == 1:
            return r.choice([0, 1, -1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1, -(2**63),
                             -(2**64), 10**6, r.randrange(-1000, 1000)])
        if pick == 2:
            return r.choice([0.0, -0.0, 1.5, 1e308, -1e308, 5e-324, math.nan, math.inf,
                             -math.inf, 0.1])
        if pick in (3, 4):
            return r.choice(HOSTILE_TEXT)
        if pick == 5:
            n = r.choice([100, 1000, 10_000, 60_000])
            return r.choice(["x", "*", "é", "\x1b", "a*"]) * (n // 2)
        if pick == 6:
            return r.randbytes(r.randrange(40))
        if pick == 7 and depth < 4:
            return [self.hostile(depth + 1) for _ in range(r.randrange(4))]
        if pick == 8 and depth < 4:
            return {r.choice(["name", "n", "x", ""]): self.hostile(depth + 1)
                    for _ in range(r.randrange(3))}
        if pick == 9:
            return r.choice(list(OPS))
        if pick == 10:
            return "".join(chr(r.choice([r.randrange(0x20, 0x7F), r.randrange(0, 0x20),
                                         r.randrange(0x80, 0x800),
                                         r.randrange(0x800, 0xD800),
                                         r.randrange(0xE000, 0x110000)]))
                           for _ in range(r.randrange(1, 30)))
        return self.valid_value(r.choice(["count", "name", "bool", "severity", "stream",
                                          "pattern", "cpu", "size"]))

    def args_for(self, op: str) -> dict[str, Any]:
        spec = OPS[op]
        return {k: self.valid_value(kind) for k, kind in spec.items()
                if kind == "name" or self.rng.random() < 0.5}

    def request(self) -> dict[str, Any]:
        op = self.rng.choice(list(OPS))
        msg: dict[str, Any] = {"v": 1, "id": self._id(), "op": op}
        args = self.args_for(op)
        if args or self.rng.random() < 0.3:
            msg["args"] = args
        return msg

    # ------------------------------------------------------------------ families
    def _valid(self) -> bytes:
        return enc(self.request())

    def _args(self) -> bytes:
        r = self.rng
        msg = self.request()
        args: dict[str, Any] = dict(msg.get("args", {}))
        for _ in range(r.randrange(1, 4)):
            how = r.randrange(5)
            keys = list(OPS[msg["op"]]) or ["name"]
            if how == 0:  # unknown argument
                args[r.choice(["pad", "Name", "name ", "", "\x1b[2J", "dry-run", "raw",
                               "uid"])] = self.hostile()
            elif how == 1 and args:  # a required one missing
                args.pop(r.choice(list(args)))
            else:  # a known argument with any value
                args[r.choice(keys)] = self.hostile()
        msg["args"] = args
        return enc(msg)

    def _shape(self) -> bytes:
        r = self.rng
        msg: Any = self.request()
        how = r.randrange(9)
        if how == 0:
            msg.pop(r.choice(["v", "id", "op"]))
        elif how == 1:
            msg["v"] = r.choice([0, 2, -1, "1", 1.0, None, True, 2**64 - 1, [1]])
        elif how == 2:
            msg["id"] = r.choice([-1, 2**64 - 1, 0, "7", 1.5, None, [7], b"\x07", True])
        elif how == 3:
            msg["op"] = r.choice(["", "Status", "x" * 65, "no.such-op", "pin ", "ps\x00",
                                  "stauts", "ëvents", 5, None, ["ps"], b"ps",
                                  f"{r.choice(list(OPS))}{r.choice(['', '.', 'x'])}"])
        elif how == 4:
            msg["args"] = self.hostile()
        elif how == 5:
            msg[r.choice(["uid", "pid", "more", "result", "V", "", "args2"])] = self.hostile()
        elif how == 6:
            msg = Pairs([(r.choice([1, -1, b"op", 1.5]) if r.random() < 0.5 else k, v)
                         for k, v in msg.items()])
        elif how == 7:
            msg = r.choice([[msg], list(msg.values()), "status", 42, None, b"\xa0", True])
        else:
            msg["args"] = {r.choice([1, b"name", -5]): "x"}
        return enc(msg)

    def _cbor(self) -> bytes:
        r = self.rng
        msg = self.request()
        key = r.choice(list(msg))
        val = msg[key]
        how = r.randrange(14)
        if how == 0:  # a tag around some item, or the whole frame
            tag = r.choice([0, 1, 2, 3, 4, 5, 21, 24, 25, 28, 29, 30, 32, 35, 55799, 256,
                            258, 2**32, 2**64 - 1])
            if r.random() < 0.5:
                return enc(Tag(tag, msg))
            msg[key] = Tag(tag, val)
        elif how == 1:  # indefinite lengths
            if isinstance(val, str):
                msg[key] = Indef(3, [val[:1], val[1:]], r.random() < 0.8)
            else:
                return enc(Indef(5, [x for kv in msg.items() for x in kv], r.random() < 0.8))
        elif how == 2:  # a duplicate key
            return enc(Pairs([*msg.items(), (key, r.choice([val, self.hostile()]))]))
        elif how == 3:
            msg[key] = Simple(r.choice([0, 19, 23, 24, 31, 32, 255]))
        elif how == 4:
            msg[key] = Float(r.choice([1.0, 65504.0, 1e-8, math.nan, math.inf]),
                             r.choice([2, 4, 8]))
        elif how == 5:  # a head longer than needed
            n = val if isinstance(val, int) and 0 <= val < 256 else 1
            msg[key] = Wide(n, r.choice([1, 2, 4, 8]))
        elif how == 6:  # a length that lies
            return enc(Pairs(list(msg.items())[:-1])) + enc(
                Lie(r.choice([2, 3, 4, 5]), r.choice([2**63, 2**32, 1000, 70_000]), b"ab"))
        elif how == 7:  # invalid UTF-8 in a text string
            bad = r.choice([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"])
            msg[key] = Raw(_head(3, len(bad) + 2) + b"ok" + bad)
        elif how == 8:  # nesting around the depth limit (written flat: no recursion here)
            depth = r.choice([MAX_DEPTH - 3, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 500, 5000])
            heads = b"".join(r.choice([b"\x81", b"\xa1\x61k"]) for _ in range(depth))
            msg.setdefault("args", {})["deep"] = Raw(heads + b"\x00")
        elif how == 9:  # items around the count limit
            n = r.choice([MAX_ITEMS - 10, MAX_ITEMS, MAX_ITEMS + 1, 30_000])
            msg.setdefault("args", {})["many"] = Raw(_head(4, n) + b"\x00" * n)
        elif how == 10:  # trailing bytes, or two items
            return enc(msg) + r.choice([b"\x00", b"\xff", enc(msg)])
        elif how == 11:  # a reserved head or a stray break
            return enc(msg)[:-1] + bytes([r.choice([0x1C, 0x3D, 0x5E, 0x7F, 0xFF, 0xBF])])
        elif how == 12:  # a map with a container as a key
            return enc(Pairs([([1], 2), *msg.items()]))
        else:  # the whole frame as bytes or text
            return enc(r.choice([enc(msg), enc(msg).decode("latin-1")]))
        return enc(msg)

    def _bytes(self) -> bytes:
        r = self.rng
        data = bytearray(self._valid())
        for _ in range(r.randrange(1, 4)):
            how = r.randrange(6)
            pos = r.randrange(len(data) + 1)
            if how == 0 and data:
                data[min(pos, len(data) - 1)] ^= 1 << r.randrange(8)
            elif how == 1:
                data[pos:pos] = r.randbytes(r.randrange(1, 5))
            elif how == 2:
                del data[pos : pos + r.randrange(1, 5)]
            elif how == 3:
                del data[pos:]
            elif how == 4:
                data[pos:pos] = self._valid()[r.randrange(8):]
            elif data:
                data[min(pos, len(data) - 1)] = r.choice([0x00, 0x1F, 0x3F, 0x5F, 0x7F, 0x9F,
                                                          0xBF, 0xDF, 0xF7, 0xFF])
        return bytes(data)

    def _random(self) -> bytes:
        r = self.rng
        n = r.choice([r.randrange(1, 16), r.randrange(16, 512), r.randrange(512, 8192)])
        return r.randbytes(n)

    def _empty(self) -> bytes:
        return b""

    def _big(self) -> bytes:
        r = self.rng
        size = r.choice([MAX_FRAME, MAX_FRAME + 1, MAX_FRAME + 100, 2 * MAX_FRAME, 200_000])
        rid, pad = self._id(), 0
        for _ in range(4):  # the pad's length head grows with it: converge on the size
            frame = enc({"v": 1, "id": rid, "op": "status", "args": {"pad": b"\0" * pad}})
            pad += size - len(frame)
        return frame
