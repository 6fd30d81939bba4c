"""Control protocol: one CBOR map per SOCK_SEQPACKET message (pure, no I/O).

Request::

    {"v": 1, "id": uint, "op": str, "args": {str: any}}      # "args" optional

Reply::

    {"v": 1, "id": id, "ok": true,  "result": any}
    {"v": 1, "id": id, "ok": false, "error": {"code": str, "message": str, "hint"?: str}}

A streamed reply is any number of ``{"v":1,"id":id,"ok":true,"more":true,"result":...}``
messages ending with one normal reply.  See docs/protocol.md.

Decoding happens at the trust boundary, so frames are first *scanned* without building
any object: the scan enforces the size, nesting depth and item-count limits, rejects CBOR
tags (which make cbor2 construct datetimes, regexes, shared references and the like),
indefinite lengths, simple values other than false/true/null, non-scalar or duplicate map
keys and trailing bytes.  Only a frame that passes is handed to ``cbor2.loads``.  The scan
is iterative, so a hostile frame cannot exhaust the recursion limit either.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, TypeGuard, TypeVar

import cbor2

from agent.core.errors import AgentError, ProtocolError

__all__ = [
    "MAX_DEPTH",
    "MAX_FRAME",
    "MAX_ITEMS",
    "MAX_REQUEST_ITEMS",
    "OP_RE",
    "VERSION",
    "Handler",
    "Peer",
    "Reply",
    "Request",
    "RequestError",
    "arg",
    "check_args",
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_reply",
    "encode_request",
    "error_from_wire",
    "plain",
]

VERSION = 1
MAX_FRAME = 64 * 1024
MAX_DEPTH = 32
MAX_ITEMS = 16384  # in a reply (an events list)
# In a request: no op takes more than a few dozen, and the scan is pure Python (about
# 50 us an item on the box's CPU): 16384 items held the loop for 0.8 s (bench/fuzz.py).
MAX_REQUEST_ITEMS = 1024
OP_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")

_REQUEST_KEYS = frozenset({"v", "id", "op", "args"})
_REPLY_KEYS = frozenset({"v", "id", "ok", "result", "error", "more"})
_U64 = 2**64


class RequestError(ProtocolError):
    """A request that could not be decoded; ``request_id`` is its id when recoverable, else 0."""

    def __init__(self, code: str, message: str, hint: str | None = None, request_id: int = 0):
        super().__init__(code, message, hint)
        self.request_id = request_id


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    id: int
    ok: bool
    result: Any = None
    error: AgentError | None = None
    more: bool = False


# --------------------------------------------------------------------------- scanning


def _bad(message: str, hint: str | None = None) -> RequestError:
    return RequestError("E_CBOR", message, hint)


def _scan(frame: bytes, max_items: int = MAX_ITEMS) -> None:
    """Check that ``frame`` is exactly one well-formed CBOR item inside our profile."""
    n = len(frame)
    pos = 0
    items = 0
    # One entry per open container: [remaining items, is_map, keys seen (maps only)].
    stack: list[tuple[list[int], bool, set[tuple[int, object]] | None]] = []
    while True:
        if pos >= n:
            raise _bad("truncated CBOR item")
        ib = frame[pos]
        pos += 1
        major, info = ib >> 5, ib & 0x1F
        if info < 24:
            arg = info
        elif info <= 27:
            size = 1 << (info - 24)
            if pos + size > n:
                raise _bad("truncated CBOR item header")
            arg = int.from_bytes(frame[pos : pos + size], "big")
            pos += size
        elif info == 31:
            raise _bad("indefinite-length CBOR items are not accepted",
                       "encode strings, arrays and maps with definite lengths")
        else:
            raise _bad(f"reserved CBOR additional information {info}")
        items += 1
        if items > max_items:
            raise _bad(f"more than {max_items} CBOR items in one frame")
        top = stack[-1] if stack else None
        is_key = top is not None and top[1] and top[0][0] % 2 == 0
        key: tuple[int, object] | None = None
        opened = False
        if major in (0, 1):
            key = (major, arg)
        elif major in (2, 3):
            if arg > n - pos:
                raise _bad("truncated CBOR string")
            key = (major, frame[pos : pos + arg])
            pos += arg
        elif major in (4, 5):
            if is_key:
                raise _bad("map keys must be integers or strings")
            if len(stack) >= MAX_DEPTH:
                raise _bad(f"CBOR nesting deeper than {MAX_DEPTH}")
            count = arg * 2 if major == 5 else arg
            if count > n - pos:  # every item takes at least one byte
                raise _bad("truncated CBOR container")
            if count:
                stack.append(([count], major == 5, set() if major == 5 else None))
                opened = True
        elif major == 6:
            raise _bad(f"CBOR tag {arg} is not accepted", "send plain CBOR without semantic tags")
        else:  # major 7
            if info not in (20, 21, 22, 25, 26, 27):
                raise _bad(f"CBOR simple value {arg if info < 24 else info} is not accepted")
            if is_key:
                raise _bad("map keys must be integers or strings")
        if is_key and top is not None:
            keys = top[2]
            assert keys is not None and key is not None
            if key in keys:
                raise _bad("duplicate key in CBOR map")
            keys.add(key)
        if opened:
            continue
        # The item is complete: count it against its containers, closing those that fill up.
        while stack:
            remaining = stack[-1][0]
            remaining[0] -= 1
            if remaining[0]:
                break
            stack.pop()
        if not stack:
            break
    if pos != n:
        raise _bad(f"{n - pos} trailing bytes after the CBOR item")


def _loads(frame: bytes, max_items: int = MAX_ITEMS) -> Any:
    if len(frame) > MAX_FRAME:
        raise RequestError("E_FRAME_TOO_BIG", f"frame of {len(frame)} bytes exceeds {MAX_FRAME}",
                           "split the request or send smaller arguments")
    _scan(frame, max_items)
    try:
        return cbor2.loads(frame)
    except Exception as exc:  # cbor2 raises CBORDecodeError, ValueError, UnicodeDecodeError...
        raise _bad(f"undecodable CBOR: {exc}") from None


# --------------------------------------------------------------------------- requests


def _uint(value: object) -> TypeGuard[int]:
    return type(value) is int and 0 <= value < _U64


def decode_request(frame: bytes) -> Request:
    """Decode and validate one request frame; raises :class:`RequestError` (E_FRAME_TOO_BIG,
    E_CBOR, E_SHAPE or E_VERSION) with the request id when it could be recovered."""
    obj = _loads(frame, MAX_REQUEST_ITEMS)
    if not isinstance(obj, dict):
        raise RequestError("E_SHAPE", f"request must be a CBOR map, got {_kind(obj)}")
    raw_id = obj.get("id")
    rid = raw_id if _uint(raw_id) else 0

    def shape(message: str, hint: str | None = None) -> RequestError:
        return RequestError("E_SHAPE", message, hint, rid)

    if "v" not in obj:
        raise shape('request has no "v" (protocol version)', f'add "v": {VERSION}')
    v = obj["v"]
    if type(v) is not int:
        raise shape(f'"v" must be an integer, got {_kind(v)}')
    if v != VERSION:
        raise RequestError("E_VERSION", f"protocol version {v} is not supported",
                           f"this agentd speaks version {VERSION}", rid)
    unknown = sorted(repr(k) for k in obj if k not in _REQUEST_KEYS)
    if unknown:
        raise shape(f"unknown request key(s) {', '.join(unknown)}",
                    'a request has only "v", "id", "op" and "args"')
    if "id" not in obj or not _uint(obj["id"]):
        raise shape('"id" must be an unsigned integer below 2**64')
    op = obj.get("op")
    if not isinstance(op, str) or not OP_RE.fullmatch(op):
        raise shape('"op" must be a short lower-case identifier such as "status"')
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise shape(f'"args" must be a map, got {_kind(args)}')
    for k in args:
        if not isinstance(k, str):
            raise shape(f'"args" keys must be strings, got {_kind(k)}')
    return Request(obj["id"], op, args)


def encode_request(req_id: int, op: str, args: Mapping[str, Any] | None = None) -> bytes:
    msg: dict[str, Any] = {"v": VERSION, "id": req_id, "op": op}
    if args:
        msg["args"] = plain(dict(args))
    return cbor2.dumps(msg)


# --------------------------------------------------------------------------- replies


def encode_reply(req_id: int, result: Any = None, *, more: bool = False) -> bytes:
    """Encode a success reply (or, with ``more``, one message of a stream).

    ``result`` is first converted with :func:`plain`; raises TypeError/ValueError for
    values that cannot go on the wire.  Callers check the size against MAX_FRAME.
    """
    msg: dict[str, Any] = {"v": VERSION, "id": req_id, "ok": True, "result": plain(result)}
    if more:
        msg["more"] = True
    return cbor2.dumps(msg)


def encode_error(req_id: int, err: AgentError) -> bytes:
    wire = err.to_wire()
    wire["message"] = wire["message"][:4096]
    return cbor2.dumps({"v": VERSION, "id": req_id, "ok": False, "error": wire})


def error_from_wire(obj: Any) -> AgentError:
    """Rebuild an :class:`AgentError` from a reply's error object."""
    if not isinstance(obj, dict):
        raise ProtocolError("E_PROTOCOL", "reply error is not a map")
    code, message, hint = obj.get("code"), obj.get("message"), obj.get("hint")
    if not isinstance(code, str) or not isinstance(message, str):
        raise ProtocolError("E_PROTOCOL", "reply error lacks a code or message")
    return AgentError(code, message, hint if isinstance(hint, str) else None)


def decode_reply(frame: bytes) -> Reply:
    """Decode one reply frame; raises :class:`ProtocolError` (E_PROTOCOL) if malformed."""
    try:
        obj = _loads(frame)
    except RequestError as exc:
        raise ProtocolError("E_PROTOCOL", f"bad reply: {exc.message}") from None
    if not isinstance(obj, dict) or obj.get("v") != VERSION or not _uint(obj.get("id")):
        raise ProtocolError("E_PROTOCOL", "reply is not a version-1 map with an id")
    if any(k not in _REPLY_KEYS for k in obj):
        raise ProtocolError("E_PROTOCOL", "reply has unknown keys")
    ok, more = obj.get("ok"), obj.get("more", False)
    if not isinstance(ok, bool) or not isinstance(more, bool):
        raise ProtocolError("E_PROTOCOL", 'reply "ok"/"more" must be booleans')
    if ok:
        return Reply(obj["id"], True, obj.get("result"), None, more)
    return Reply(obj["id"], False, None, error_from_wire(obj.get("error")), False)


# --------------------------------------------------------------------------- plain values


_SCALARS = frozenset({str, bool, float, bytes, type(None)})
_KEYS = frozenset({str, int, bytes})


def plain(obj: Any, _depth: int = 0) -> Any:
    """Convert ``obj`` to plain CBOR data (no tags): tuples/sets become lists, paths and
    addresses strings, enums their value, objects with ``to_wire()`` their wire form.

    The exact built-in types go first, without ``isinstance``: a reply of 500 events is
    some 10,000 values, and this conversion was 95 % of its encoding (bench/fuzz.py)."""
    if _depth > MAX_DEPTH:
        raise ValueError(f"value nested deeper than {MAX_DEPTH}")
    t = type(obj)
    if t in _SCALARS:
        return obj
    if t is int:
        if not -_U64 <= obj < _U64:
            raise ValueError(f"integer {obj} does not fit in 64 bits")
        return obj
    if t is dict:
        out: dict[Any, Any] = {}
        for k, v in obj.items():
            if type(k) not in _KEYS and (not isinstance(k, str | int | bytes)
                                         or isinstance(k, bool)):
                raise TypeError(f"map key {k!r} is not a string or integer")
            out[k] = plain(v, _depth + 1)
        return out
    if t is list:
        return [plain(v, _depth + 1) for v in obj]
    return _plain_other(obj, _depth)


def _plain_other(obj: Any, _depth: int) -> Any:
    """:func:`plain` for subclasses, enums, containers other than dict and list, paths,
    addresses and objects with a wire form."""
    if isinstance(obj, bool | str | bytes):
        return obj
    if isinstance(obj, enum.Enum):
        return plain(obj.value, _depth + 1)
    if isinstance(obj, int):
        if not -_U64 <= obj < _U64:
            raise ValueError(f"integer {obj} does not fit in 64 bits")
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, dict):
        return plain(dict(obj), _depth)
    if isinstance(obj, list | tuple):
        return [plain(v, _depth + 1) for v in obj]
    if isinstance(obj, set | frozenset):
        return [plain(v, _depth + 1) for v in sorted(obj, key=repr)]
    if isinstance(obj, PurePath | ipaddress.IPv4Address | ipaddress.IPv6Address
                  | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(obj)
    to_wire = getattr(obj, "to_wire", None)
    if callable(to_wire):
        return plain(to_wire(), _depth + 1)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain(dataclasses.asdict(obj), _depth + 1)
    raise TypeError(f"cannot send a {type(obj).__name__} over the control protocol")


def _kind(obj: Any) -> str:
    return {dict: "map", list: "array", str: "string", bytes: "bytes", bool: "boolean",
            int: "integer", float: "float", type(None): "null"}.get(type(obj), type(obj).__name__)


# ---------------------------------------------------------------------- handler arguments

T = TypeVar("T")
# An op handler: (peer, args) -> a result, or an async iterator of results (streamed ops).
Handler = Callable[["Peer", Mapping[str, Any]], Awaitable[Any] | AsyncIterator[Any]]


@dataclass(frozen=True)
class Peer:
    """The process on the other end of a connection, as the kernel saw it at connect()."""

    uid: int
    gid: int
    pid: int

    def to_wire(self) -> dict[str, int]:
        return {"uid": self.uid, "gid": self.gid, "pid": self.pid}


def _args_error(message: str, hint: str | None = None) -> ProtocolError:
    return ProtocolError("E_ARGS", message, hint)


def check_args(args: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Refuse arguments a handler does not know (E_ARGS)."""
    allowed = set(allowed)
    for name in args:
        if name not in allowed:
            raise _args_error(f"unknown argument `{name}`",
                              f"accepted: {', '.join(sorted(allowed)) or 'none'}")


def arg(args: Mapping[str, Any], name: str, kind: type[T], default: T | None = None, *,
        required: bool = False) -> T | None:
    """``args[name]`` checked to be a ``kind`` (bool is not an int); E_ARGS otherwise."""
    if name not in args or args[name] is None:
        if required:
            raise _args_error(f"missing argument `{name}`")
        return default
    value = args[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _args_error(f"argument `{name}` must be {kind.__name__}, "
                          f"got {type(value).__name__}")
    return value
