"""The control socket: a Unix SOCK_SEQPACKET server on the daemon's asyncio loop.

* The caller's identity comes from the kernel (SO_PEERCRED) when it connects, never from
  a message.
* :class:`Dispatcher` maps an op name to an async handler ``(peer, args) -> result``, or an
  async generator for streamed ops.  Every failure becomes an error reply: an
  :class:`AgentError` keeps its code, anything else is logged with its traceback and
  answered E_INTERNAL.  A handler can never stop the server.
* A request refused because of who asks (:data:`IDENTITY_REFUSALS`: no role, an op or a
  service the role may not use) is also told to ``Dispatcher.on_refused`` (agentd
  publishes ``agent/control-denied``: someone probing what the socket lets them do,
  channel 4's concern).  Refusals of what a permitted caller asked for (a ceiling, a
  privilege, a share) are an operator's everyday errors, not probes.
* Each message is received with ``recv_into(MAX_FRAME + 1, MSG_TRUNC)``: the kernel tells
  the real size of an oversized message (and discards its tail), which gets E_FRAME_TOO_BIG.
* Connections are bounded (``max_connections``); one above the bound is told E_BUSY and
  closed (reading its first request into a small buffer: a flood of them costs little).
  The listen backlog is the kernel's maximum, so a burst of connects queues instead of
  failing with EAGAIN.  Requests on one connection run concurrently (bounded) and
  replies carry ids.
* A client that stops reading is dropped: a reply that cannot be sent within
  ``send_timeout`` (30 s) closes the connection, freeing the replies it held back (up
  to 16 of 64 KiB each) and its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import errno
import inspect
import logging
import os
import select
import socket
import stat
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError, KernelError, ProtocolError
from agent.core.protocol import (
    MAX_FRAME,
    OP_RE,
    Handler,
    Peer,
    Request,
    RequestError,
    decode_request,
    encode_error,
    encode_reply,
)

__all__ = ["IDENTITY_REFUSALS", "ControlServer", "Dispatcher", "peer_of"]

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_BUSY_PEEK = 1024  # bytes of a refused connection's first request read for its id
IDENTITY_REFUSALS = frozenset({"E_POLICY_ROLE", "E_POLICY_OP", "E_POLICY_SERVICE"})
SEND_TIMEOUT = 30.0  # s: a reply not taken by then means the client stopped reading


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(uid=uid, gid=gid, pid=pid)


# ---------------------------------------------------------------------- dispatcher

class Dispatcher:
    """Op name -> handler.  ``handle`` turns one request into reply frames."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        # (peer, op, error code) of every request refused by policy
        self.on_refused: Callable[[Peer, str, str], None] | None = None

    def register(self, op: str, handler: Handler) -> None:
        if not OP_RE.fullmatch(op):
            raise ValueError(f"bad op name {op!r}")
        if op in self._handlers:
            raise ValueError(f"op {op!r} is already registered")
        self._handlers[op] = handler

    @property
    def ops(self) -> list[str]:
        return sorted(self._handlers)

    async def handle(self, peer: Peer, req: Request) -> AsyncIterator[bytes]:
        """Yield the encoded reply frames for ``req`` (several for a streamed op)."""
        handler = self._handlers.get(req.op)
        if handler is None:
            close = difflib.get_close_matches(req.op, self._handlers, n=1)
            hint = f"did you mean `{close[0]}`?" if close else \
                f"known ops: {', '.join(self.ops)}"
            yield encode_error(req.id, ProtocolError("E_UNKNOWN_OP",
                                                     f"unknown op `{req.op}`", hint))
            return
        try:
            outcome = handler(peer, req.args)
            if inspect.isawaitable(outcome):
                yield _reply(req, await outcome)
                return
            agen = outcome
            try:
                async for item in agen:
                    yield _reply(req, item, more=True)
            finally:
                aclose = getattr(agen, "aclose", None)
                if aclose is not None:
                    await aclose()
            yield _reply(req, None)
        except AgentError as exc:
            if exc.code in IDENTITY_REFUSALS and self.on_refused is not None:
                try:
                    self.on_refused(peer, req.op, exc.code)
                except Exception:  # reporting must not change the reply
                    log.exception("op %s: reporting the refusal failed", req.op)
            yield encode_error(req.id, exc)
        except Exception as exc:
            log.exception("op %s from pid %d failed", req.op, peer.pid)
            yield encode_error(req.id, AgentError(
                "E_INTERNAL", f"internal error in `{req.op}`: {type(exc).__name__}: {exc}",
                "this is a bug in agentd; the daemon log has the traceback"))


def _reply(req: Request, result: Any, *, more: bool = False) -> bytes:
    try:
        frame = encode_reply(req.id, result, more=more)
    except (TypeError, ValueError) as exc:
        raise AgentError("E_INTERNAL", f"`{req.op}` returned an unencodable result: {exc}",
                         "this is a bug in agentd") from exc
    if len(frame) > MAX_FRAME:
        raise AgentError("E_REPLY_TOO_BIG",
                         f"reply to `{req.op}` is {len(frame)} bytes, over {MAX_FRAME}",
                         "ask for less (e.g. a smaller -n)")
    return frame


# ---------------------------------------------------------------------- server

class ControlServer:
    """Listens on ``path``; one task per connection, bounded by ``max_connections``."""

    def __init__(self, path: Path | str, dispatcher: Dispatcher, *, max_connections: int = 64,
                 max_inflight: int = 16, mode: int = 0o660,
                 send_timeout: float = SEND_TIMEOUT) -> None:
        self.path = Path(path)
        self.dispatcher = dispatcher
        self.max_connections = max_connections
        self.max_inflight = max_inflight
        self.send_timeout = send_timeout
        self.mode = mode
        self.connections = 0
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle
    def bind(self) -> None:
        """Create the parent directory, remove a stale socket, bind mode ``self.mode``.

        The socket is bound under a temporary name, chmod-ed, then renamed into place, so
        it is never reachable with looser permissions.  A live socket (someone accepts
        connections on it) is left alone: E_BUSY.
        """
        path = self.path
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _remove_stale(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, self.mode)
            os.rename(tmp, path)
            sock.listen(socket.SOMAXCONN)  # the kernel caps it (net.core.somaxconn)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise KernelError.from_oserror("bind", str(path), exc) from None
        self._sock = sock

    def adopt(self, fd: int) -> None:
        """Serve on a socket a previous agentd bound and passed across exec (the master's
        respawn): connections that queued meanwhile are accepted now, none is refused."""
        sock = socket.socket(fileno=fd)
        # (bound under a temporary name in the same directory, then renamed: see bind)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET or \
                not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) or \
                Path(sock.getsockname()).parent != self.path.parent:
            sock.detach()
            raise KernelError("adopt", str(self.path), errno.EBADF,
                              "the passed descriptor is not this control socket")
        sock.setblocking(False)
        self._sock = sock

    def fileno(self) -> int | None:
        return self._sock.fileno() if self._sock is not None else None

    async def start(self) -> None:
        if self._sock is None:
            self.bind()
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        for task in list(self._conn_tasks):
            task.cancel()
        if self._conn_tasks:
            await asyncio.gather(*self._conn_tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    # ------------------------------------------------------------------ connections
    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: log, back off, keep serving
                log.error("accept on %s failed: %s", self.path, exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = loop.create_task(self._serve(conn))
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        self.connections += 1
        try:
            if self.connections > self.max_connections:
                # Read the first request before answering: closing a Unix socket with
                # unread data makes the peer see ECONNRESET instead of our reply.  Into a
                # small buffer: a longer request is answered with id 0.
                rid = 0
                buf = bytearray(_BUSY_PEEK)
                with contextlib.suppress(OSError, TimeoutError):
                    n = await asyncio.wait_for(_recv(loop, conn, buf), 2.0)
                    with contextlib.suppress(ProtocolError):
                        rid = decode_request(bytes(buf[:n])).id if n <= len(buf) else 0
                with contextlib.suppress(OSError):  # it may be gone already: not an error
                    await _send(loop, conn, encode_error(rid, AgentError(
                        "E_BUSY", f"more than {self.max_connections} control connections",
                        "close idle agentctl sessions and retry")), 2.0)
                return
            peer = peer_of(conn)
            inflight = asyncio.Semaphore(self.max_inflight)
            buf = bytearray(MAX_FRAME + 1)
            while True:
                await inflight.acquire()
                try:
                    n = await _recv(loop, conn, buf)
                except OSError:
                    inflight.release()
                    break
                if n == 0 and _peer_closed(conn):
                    inflight.release()
                    break
                frame = bytes(buf[:n]) if n <= MAX_FRAME else None
                task = loop.create_task(self._request(loop, conn, peer, frame, n, inflight))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except Exception:
            log.exception("control connection failed")
        finally:
            for task in list(tasks):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self.connections -= 1
            conn.close()

    async def _request(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, peer: Peer,
                       frame: bytes | None, size: int, inflight: asyncio.Semaphore) -> None:
        try:
            if frame is None:
                err = RequestError("E_FRAME_TOO_BIG",
                                   f"request of {size} bytes exceeds {MAX_FRAME}",
                                   "send smaller arguments")
                await _send(loop, conn, encode_error(0, err), self.send_timeout)
                return
            try:
                req = decode_request(frame)
            except RequestError as exc:
                await _send(loop, conn, encode_error(exc.request_id, exc), self.send_timeout)
                return
            log.debug("op %s id %d from uid %d pid %d", req.op, req.id, peer.uid, peer.pid)
            async for out in self.dispatcher.handle(peer, req):
                await _send(loop, conn, out, self.send_timeout)
        except ConnectionAbortedError as exc:  # it stopped reading: cut off (_send)
            log.warning("control connection of pid %d dropped: %s", peer.pid, exc)
        except OSError as exc:  # the client went away mid-reply
            log.debug("reply not delivered: %s", exc)
        except Exception:
            log.exception("control request failed")
        finally:
            inflight.release()


async def _recv(loop: asyncio.AbstractEventLoop, conn: socket.socket, buf: bytearray) -> int:
    """One message; returns its real length (may exceed ``len(buf)``), 0 at EOF."""
    while True:
        try:
            return conn.recv_into(buf, len(buf), socket.MSG_TRUNC)
        except (BlockingIOError, InterruptedError):
            pass
        ready: asyncio.Future[None] = loop.create_future()
        fd = conn.fileno()
        loop.add_reader(fd, _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(fd)


def _peer_closed(conn: socket.socket) -> bool:
    """After a 0-byte recv: end of file, or an empty SEQPACKET message?"""
    p = select.poll()
    p.register(conn.fileno(), select.POLLIN | select.POLLRDHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP) for _, ev in p.poll(0))


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _send(loop: asyncio.AbstractEventLoop, conn: socket.socket, frame: bytes,
                timeout: float) -> None:
    """Send one reply; a client that has not taken it within ``timeout`` is cut off (both
    directions shut: the connection's reader sees the end and cleans up).  Sent at once
    when the socket has room (the usual case): a reply leaves before anything the handler
    scheduled with ``call_soon`` runs (``respawn`` replies, then re-executes agentd)."""
    try:
        sent = conn.send(frame)  # SOCK_SEQPACKET: all of it or nothing
    except (BlockingIOError, InterruptedError):
        sent = 0
    if sent == len(frame):
        return
    frame = frame[sent:]
    try:
        await asyncio.wait_for(loop.sock_sendall(conn, frame), timeout)
    except TimeoutError:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        raise ConnectionAbortedError(errno.ETIMEDOUT,
                                     f"reply not taken within {timeout} s") from None


def _remove_stale(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AgentError("E_BUSY", f"`{path}` exists and is not a socket",
                         "remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # stale: nobody accepts on it
        return
    except OSError as exc:  # e.g. a timeout: someone may be there; do not steal the path
        raise KernelError.from_oserror("connect", str(path), exc,
                                       "is another agentd running? stop it first") from None
    else:
        raise AgentError("E_BUSY", f"another agentd is listening on `{path}`",
                         "stop it first, or use another --socket")
    finally:
        probe.close()
