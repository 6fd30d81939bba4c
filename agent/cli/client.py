"""Synchronous control-socket client, used by agentctl and the tests.

Errors, by what the caller can do about them:

* :class:`RemoteError` (an AgentError): the daemon answered with an error object;
* :class:`ConnectError` (E_CONNECT): the daemon cannot be reached (socket missing,
  refused, permission denied);
* :class:`TransportError` (E_TIMEOUT, E_PROTOCOL): no answer in time, or an answer that
  does not follow the protocol.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Generator
from pathlib import Path
from types import TracebackType
from typing import Any

from agent.core.errors import AgentError, ProtocolError
from agent.core.protocol import MAX_FRAME, Reply, decode_reply, encode_request

__all__ = [
    "DEFAULT_SOCKET",
    "Client",
    "ConnectError",
    "RemoteError",
    "TransportError",
]

DEFAULT_SOCKET = Path("/run/agent/agentd.sock")


class RemoteError(AgentError):
    """The daemon replied with an error."""


class ConnectError(AgentError):
    """The daemon's socket cannot be reached."""


class TransportError(ProtocolError):
    """A timeout, or a reply that breaks the protocol."""


# What a failed connect() means to the operator, first match wins (OSError last).
_CONNECT_ERRORS: dict[type[OSError], tuple[type[AgentError], str, str, str]] = {
    FileNotFoundError: (ConnectError, "E_CONNECT", "socket `{path}` does not exist",
                        "is agentd running? start it, or pass --socket PATH"),
    ConnectionRefusedError: (ConnectError, "E_CONNECT", "nobody is listening on `{path}`",
                             "agentd is not running (stale socket); start it"),
    PermissionError: (ConnectError, "E_CONNECT", "permission denied on `{path}`",
                      "run as root or as a member of the socket's group"),
    TimeoutError: (TransportError, "E_TIMEOUT", "connecting to `{path}` timed out",
                   "agentd is overloaded or hung"),
    OSError: (ConnectError, "E_CONNECT", "cannot connect to `{path}`: {why}", "check --socket"),
}


class Client:
    """One connection to agentd.  Connects lazily; use as a context manager or ``close()``."""

    def __init__(self, socket_path: Path | str = DEFAULT_SOCKET,
                 timeout: float | None = 5.0) -> None:
        self.socket_path = Path(socket_path)
        self._sock: socket.socket | None = None
        self._timeout = timeout
        self._ids = itertools.count(1)

    @property
    def timeout(self) -> float | None:
        """Seconds to wait for each reply (None: for ever); a change applies to an open
        connection too (``agentctl run`` raises it after connecting)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._timeout = value
        if self._sock is not None:
            self._sock.settimeout(value)

    def connect(self) -> None:
        if self._sock is not None:
            return
        path = str(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            self._connect(sock, path)
        except OSError as exc:
            sock.close()
            for kind, (cls, code, what, hint) in _CONNECT_ERRORS.items():
                if isinstance(exc, kind):
                    raise cls(code, what.format(path=path, why=exc.strerror), hint) from None
            raise AssertionError("unreachable: OSError is in the table") from exc
        self._sock = sock

    def _connect(self, sock: socket.socket, path: str) -> None:
        """connect(), waiting while agentd's listen backlog is full: a Unix socket says
        EAGAIN at once then, even to a socket with a timeout (a burst of connects)."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                sock.connect(path)
                return
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"connect to {path}: backlog full") from None
                time.sleep(0.005)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ calls
    def call(self, op: str, /, **args: Any) -> Any:
        """Send one request and return its result; raises RemoteError on an error reply."""
        rid = self._send(op, args)
        reply = self._receive(rid)
        if reply.more:
            self.close()  # the rest of the stream would confuse the next call
            raise TransportError("E_PROTOCOL", f"`{op}` is a streamed op",
                                 "use stream() (agentctl: the follow option)")
        return reply.result

    def stream(self, op: str, /, **args: Any) -> Generator[Any, None, None]:
        """Send one request and yield each streamed result, ending at the final reply
        (whose result is yielded too unless it is None).  Leaving the iterator early closes
        the connection, which cancels the stream on the daemon's side."""
        rid = self._send(op, args)
        done = False
        try:
            while True:
                reply = self._receive(rid, stream=True)
                if not reply.more:
                    done = True
                    if reply.result is not None:
                        yield reply.result
                    return
                yield reply.result
        finally:
            if not done:
                self.close()

    # ------------------------------------------------------------------ plumbing
    def _send(self, op: str, args: dict[str, Any]) -> int:
        self.connect()
        assert self._sock is not None
        self._sock.settimeout(self.timeout)  # it may have changed since the connect
        rid = next(self._ids)
        frame = encode_request(rid, op, args)
        if len(frame) > MAX_FRAME:
            raise TransportError("E_FRAME_TOO_BIG",
                                 f"request of {len(frame)} bytes exceeds {MAX_FRAME}",
                                 "send smaller arguments")
        try:
            self._sock.send(frame)
        except TimeoutError:
            raise TransportError("E_TIMEOUT", f"sending `{op}` timed out") from None
        except OSError as exc:
            self.close()
            raise ConnectError("E_CONNECT", f"lost the connection to agentd: {exc.strerror}",
                               "agentd may have stopped; check it") from None
        return rid

    def _receive(self, rid: int, *, stream: bool = False) -> Reply:
        assert self._sock is not None
        buf = bytearray(MAX_FRAME + 1)
        try:
            n = self._sock.recv_into(buf, len(buf), socket.MSG_TRUNC)
        except TimeoutError:
            self.close()
            raise TransportError("E_TIMEOUT", f"no reply within {self.timeout} s",
                                 "agentd is overloaded or hung; retry or raise --timeout"
                                 ) from None
        except OSError as exc:
            self.close()
            raise ConnectError("E_CONNECT", f"lost the connection to agentd: {exc.strerror}",
                               "agentd may have stopped; check it") from None
        if n == 0:
            self.close()
            raise TransportError("E_PROTOCOL", "agentd closed the connection without a reply",
                                 "agentd may have stopped or restarted")
        if n > MAX_FRAME:
            self.close()
            raise TransportError("E_PROTOCOL", f"reply of {n} bytes exceeds {MAX_FRAME}")
        try:
            reply = decode_reply(bytes(buf[:n]))
        except ProtocolError as exc:
            self.close()
            raise TransportError(exc.code, exc.message, exc.hint) from None
        if not reply.ok and reply.id in (rid, 0):
            assert reply.error is not None
            raise RemoteError(reply.error.code, reply.error.message, reply.error.hint)
        if reply.id != rid:
            self.close()
            raise TransportError("E_PROTOCOL", f"reply id {reply.id} does not match {rid}")
        return reply
