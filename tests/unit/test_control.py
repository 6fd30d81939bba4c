"""A real agentd (Daemon on its own loop in a thread) on a SEQPACKET socket in tmp_path."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent import __version__
from agent.cli.client import Client, ConnectError, RemoteError, TransportError
from agent.core.config import AgentConfig
from agent.core.errors import AgentError, NotFoundError, RefusedError
from agent.core.protocol import (
    MAX_FRAME,
    Handler,
    Peer,
    arg,
    check_args,
    decode_reply,
    encode_request,
)
from agent.daemon.server import Daemon, cgroup_mode


class Running:
    def __init__(self, daemon: Daemon, loop: asyncio.AbstractEventLoop,
                 thread: threading.Thread) -> None:
        self.daemon, self.loop, self.thread = daemon, loop, thread
        self.path = daemon.config.socket_path

    def client(self, timeout: float = 5.0) -> Client:
        return Client(self.path, timeout)

    def raw(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(5)
        s.connect(str(self.path))
        return s

    def in_loop(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(5)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.daemon.request_stop)
        self.thread.join(10)
        assert not self.thread.is_alive()


async def _crash(peer: Peer, args: Mapping[str, Any]) -> Any:
    raise RuntimeError("handler exploded")


async def _notfound(peer: Peer, args: Mapping[str, Any]) -> Any:
    raise NotFoundError("E_NOCELL", "no cell `tv`", "list cells first")


async def _refuse(peer: Peer, args: Mapping[str, Any]) -> Any:
    raise RefusedError(str(args.get("code", "E_POLICY_ROLE")), "refused", "ask the vendor")


async def _count(peer: Peer, args: Mapping[str, Any]) -> AsyncIterator[int]:
    check_args(args, ("upto", "fail_at"))
    upto = arg(args, "upto", int, 3)
    fail_at = arg(args, "fail_at", int)
    assert upto is not None
    for i in range(upto):
        if i == fail_at:
            raise AgentError("E_MIDWAY", f"failed at {i}")
        yield i


async def _big(peer: Peer, args: Mapping[str, Any]) -> Any:
    return "x" * (MAX_FRAME + 1)


async def _unencodable(peer: Peer, args: Mapping[str, Any]) -> Any:
    return {"obj": object()}


async def _sleep(peer: Peer, args: Mapping[str, Any]) -> Any:
    seconds = arg(args, "s", float, 0.0)
    assert seconds is not None
    await asyncio.sleep(seconds)
    return seconds


def start_daemon(tmp_path: Path, configure: Callable[[Daemon], None] | None = None) -> Running:
    run = tmp_path / "run"
    cfg = AgentConfig(socket_path=run / "agentd.sock", run_dir=run, state_dir=tmp_path / "state")
    daemon = Daemon(cfg)
    handlers: list[tuple[str, Handler]] = [
        ("test.crash", _crash), ("test.notfound", _notfound), ("test.count", _count),
        ("test.big", _big), ("test.unencodable", _unencodable), ("test.sleep", _sleep),
        ("test.refuse", _refuse)]
    for op, h in handlers:
        daemon.register(op, h)
    if configure:
        configure(daemon)
    loop = asyncio.new_event_loop()
    failure: list[BaseException] = []

    def main() -> None:
        try:
            loop.run_until_complete(daemon.run(install_signals=False))
        except BaseException as exc:
            failure.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while True:
        if failure:
            raise failure[0]
        try:
            with Client(cfg.socket_path, 1) as c:
                c.call("ping")
            break
        except (ConnectError, TransportError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    return Running(daemon, loop, thread)


@pytest.fixture
def agentd(tmp_path: Path) -> Iterator[Running]:
    r = start_daemon(tmp_path)
    yield r
    r.stop()


def raw_call(s: socket.socket, frame: bytes) -> Any:
    s.send(frame)
    return decode_reply(s.recv(MAX_FRAME + 1))


# ------------------------------------------------------------------ basics

def test_ping_status_and_files(agentd: Running) -> None:
    with agentd.client() as c:
        assert c.call("ping") == "pong"
        st = c.call("status")
    uts = os.uname()
    assert st["version"] == __version__ and st["pid"] == os.getpid()
    assert st["kernel"] == uts.release and st["machine"] == uts.machine
    assert st["cgroup"] == cgroup_mode() and st["cgroup"] in ("v1", "v2", "none")
    assert st["cells"] == 0 and st["events"] >= 1 and 0 <= st["uptime_s"] < 60
    mode = agentd.path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    assert stat.S_IMODE(agentd.path.parent.stat().st_mode) == 0o755
    pidfile = agentd.daemon.config.run_dir / "agentd.pid"
    assert pidfile.read_text().strip() == str(os.getpid())
    agentd.stop()
    assert not agentd.path.exists() and not pidfile.exists()
    agentd.thread.join()


def test_started_event_and_events_op(agentd: Running) -> None:
    with agentd.client() as c:
        evs = c.call("events")
        # the kernel feature report comes first (notice when a feature is missing)
        assert [(e["channel"], e["kind"]) for e in evs] == \
            [("master", "kernel-features"), ("master", "started")]
        assert evs[1]["severity"] == "notice"
        assert evs[0]["attrs"]["summary"].startswith("kernel ")
        assert evs[1]["attrs"]["pid"] == os.getpid()
        agentd.in_loop(lambda: [agentd.daemon.bus.emit("tuner", f"resize{i}", cell="tv")
                                for i in range(30)])
        assert len(c.call("events")) == 20
        assert [e["kind"] for e in c.call("events", n=2)] == ["resize28", "resize29"]
        assert len(c.call("events", kind="resize*", n=100)) == 30
        assert "started" in [e["kind"] for e in c.call("events", severity="notice")]
        assert c.call("events", cell="radio") == []
        with pytest.raises(RemoteError) as info:
            c.call("events", n="many")
        assert info.value.code == "E_ARGS"
        with pytest.raises(RemoteError) as info:
            c.call("events", bogus=1)
        assert info.value.code == "E_ARGS" and "bogus" in info.value.message


def test_events_reply_is_trimmed_to_fit(agentd: Running) -> None:
    # distinct kinds: 200 events of one kind at once would be coalesced by the bus
    agentd.in_loop(lambda: [agentd.daemon.bus.emit("tuner", f"fat{i}", blob="y" * 1000)
                            for i in range(200)])
    with agentd.client() as c:
        evs = c.call("events", n=1000)
    assert 30 < len(evs) < 200 and all(e["kind"].startswith("fat") for e in evs)


def test_status_providers_and_cgroup_mode(tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    _tree(fake, "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", {"/sys/fs/cgroup": "cpu memory pids"})

    def configure(d: Daemon) -> None:
        d.proc_root, d.fs_root = fake / "proc", fake
        d.add_status("cells", lambda: 3)
        d.add_status("broken", lambda: 1 // 0)

    r = start_daemon(tmp_path, configure)
    try:
        st = r.client().call("status")
        assert st["cgroup"] == "v2" and st["cells"] == 3 and "error" in st["broken"]
    finally:
        r.stop()


def _tree(root: Path, mounts: str, controllers: dict[str, str]) -> None:
    """A fake /proc (mounts, filesystems) and each cgroup2 mount's cgroup.controllers."""
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "self" / "mounts").write_text(mounts)
    (root / "proc" / "filesystems").write_text("nodev\tcgroup\nnodev\tcgroup2\n")
    for mount, names in controllers.items():
        d = root / mount.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.controllers").write_text(names + "\n")


# The status field comes from the one layout detector (agent.kernel.cgroupdetect): a
# cgroup2 mount is v2 only with the controllers cells need (an empty unified mount
# beside v1 hierarchies, the hybrid hosts, is v1; with nothing else it is unusable).
@pytest.mark.parametrize(("mounts", "controllers", "mode"), [
    ("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", {"/sys/fs/cgroup": "cpu io memory pids"}, "v2"),
    ("tmpfs /sys/fs/cgroup tmpfs ro 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n", {},
     "v1"),
    ("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
     "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n", {"/sys/fs/cgroup/unified": ""}, "v1"),
    ("cgroup2 /mnt/cg cgroup2 rw 0 0\n", {"/mnt/cg": "cpu memory pids"}, "v2"),
    ("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", {"/sys/fs/cgroup": ""}, "none"),
    ("proc /proc proc rw 0 0\n", {}, "none"),
    ("", {}, "none"),
])
def test_cgroup_mode(tmp_path: Path, mounts: str, controllers: dict[str, str], mode: str
                     ) -> None:
    _tree(tmp_path, mounts, controllers)
    assert cgroup_mode(tmp_path / "proc", tmp_path) == mode


def test_cgroup_mode_without_proc(tmp_path: Path) -> None:
    assert cgroup_mode(tmp_path / "no-proc", tmp_path) == "none"


def test_peer_identity_from_kernel(agentd: Running) -> None:
    with agentd.client() as c:
        me = c.call("whoami")
    assert me == {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid()}


# ------------------------------------------------------------------ errors keep the server up

def test_unknown_op(agentd: Running) -> None:
    with agentd.client() as c:
        with pytest.raises(RemoteError) as info:
            c.call("stauts")
        assert info.value.code == "E_UNKNOWN_OP" and "status" in (info.value.hint or "")
        assert c.call("ping") == "pong"


@pytest.mark.parametrize(("frame", "code", "rid"), [
    (b"\xff\xfe garbage", "E_CBOR", 0),
    (cbor2.dumps({"v": 1, "id": 1, "op": "ping"}) + b"\x00", "E_CBOR", 0),
    (cbor2.dumps([1, 2, 3]), "E_SHAPE", 0),
    (cbor2.dumps({"v": 1, "id": "seven", "op": "ping"}), "E_SHAPE", 0),
    (cbor2.dumps({"v": 1, "id": 7, "op": ["ping"]}), "E_SHAPE", 7),
    (cbor2.dumps({"v": 1, "id": 8, "op": "ping", "args": "x"}), "E_SHAPE", 8),
    (cbor2.dumps({"v": 1, "id": 9, "op": "ping", "uid": 0}), "E_SHAPE", 9),
    (cbor2.dumps({"v": 3, "id": 10, "op": "ping"}), "E_VERSION", 10),
    (cbor2.dumps({"v": 1, "id": 11, "op": "ping", "args": {"x": 1}}), "E_ARGS", 11),
    (b"\xc1\x1a\x00\x00\x00\x00", "E_CBOR", 0),
    (b"\x81" * 10000 + b"\x00", "E_CBOR", 0),
    (b"", "E_CBOR", 0),
])
def test_malformed_requests_get_error_replies(agentd: Running, frame: bytes, code: str,
                                              rid: int) -> None:
    with agentd.raw() as s:
        reply = raw_call(s, frame)
        assert not reply.ok and reply.error is not None
        assert (reply.error.code, reply.id) == (code, rid)
        assert reply.error.message
        again = raw_call(s, encode_request(99, "ping"))  # same connection still served
        assert (again.id, again.result) == (99, "pong")


def test_oversized_frame(agentd: Running) -> None:
    with agentd.raw() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_FRAME)
        reply = raw_call(s, encode_request(5, "ping", {"pad": b"\0" * (MAX_FRAME + 100)}))
        assert reply.error is not None and reply.error.code == "E_FRAME_TOO_BIG"
        assert str(MAX_FRAME) in reply.error.message
        assert raw_call(s, encode_request(6, "ping")).result == "pong"
    with agentd.raw() as s:  # exactly MAX_FRAME is fine (and then fails on its args)
        frame = encode_request(7, "ping", {"pad": b""})
        frame = encode_request(7, "ping", {"pad": b"\0" * (MAX_FRAME - len(frame) - 2)})
        assert len(frame) == MAX_FRAME
        reply = raw_call(s, frame)
        assert reply.error is not None and reply.error.code == "E_ARGS"


def test_handler_failures(agentd: Running, caplog: pytest.LogCaptureFixture) -> None:
    with agentd.client() as c:
        with pytest.raises(RemoteError) as info:
            c.call("test.crash")
        assert info.value.code == "E_INTERNAL" and "handler exploded" in info.value.message
        with pytest.raises(RemoteError) as info:
            c.call("test.notfound")
        assert (info.value.code, info.value.hint) == ("E_NOCELL", "list cells first")
        with pytest.raises(RemoteError) as info:
            c.call("test.big")
        assert info.value.code == "E_REPLY_TOO_BIG"
        with pytest.raises(RemoteError) as info:
            c.call("test.unencodable")
        assert info.value.code == "E_INTERNAL"
        assert c.call("ping") == "pong"
    assert "handler exploded" in caplog.text  # the traceback went to the log


def test_a_policy_refusal_is_an_agent_event(agentd: Running) -> None:
    """Refused by policy: the reply as ever, and agent/control-denied with the kernel's
    identity of the peer (channel 4 counts them); other errors are not refusals."""
    with agentd.client() as c:
        with pytest.raises(RemoteError) as info:
            c.call("test.refuse")
        assert info.value.code == "E_POLICY_ROLE"
        with pytest.raises(RemoteError):
            c.call("test.notfound")
        with pytest.raises(RemoteError) as info:  # what a permitted caller asked: no probe
            c.call("test.refuse", code="E_POLICY_CEILING")
        assert info.value.code == "E_POLICY_CEILING"
        events = c.call("events", channel="agent", kind="control-denied")
    (e,) = events
    assert e["attrs"] == {"uid": os.getuid(), "pid": os.getpid(), "op": "test.refuse",
                          "code": "E_POLICY_ROLE"}
    assert e["severity"] == "notice" and e["cell"] is None


def test_streams(agentd: Running) -> None:
    with agentd.client() as c:
        assert list(c.stream("test.count", upto=4)) == [0, 1, 2, 3]
        assert list(c.stream("test.count", upto=0)) == []
        got: list[int] = []
        with pytest.raises(RemoteError) as info:
            for item in c.stream("test.count", upto=5, fail_at=2):
                got.append(item)
        assert got == [0, 1] and info.value.code == "E_MIDWAY"
        assert c.call("ping") == "pong"
        with pytest.raises(TransportError):
            c.call("test.count")  # a streamed op through call() is refused clearly
    with agentd.client() as c:
        assert c.call("ping") == "pong"


def test_events_follow_and_cancel_on_disconnect(agentd: Running) -> None:
    bus = agentd.daemon.bus
    c = agentd.client()
    stream = c.stream("events.follow", n=1, kind="tick*")
    agentd.in_loop(lambda: bus.emit("tuner", "tick0"))
    assert next(stream)["kind"] == "tick0"  # the recent one
    agentd.in_loop(lambda: bus.emit("tuner", "other"))
    agentd.in_loop(lambda: bus.emit("tuner", "tick1", cell="tv"))
    ev = next(stream)
    assert (ev["kind"], ev["cell"]) == ("tick1", "tv")
    assert agentd.in_loop(lambda: bus.subscribers) == 1
    stream.close()  # leaving the stream closes the connection; the daemon unsubscribes
    deadline = time.monotonic() + 5
    while agentd.in_loop(lambda: bus.subscribers) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert agentd.in_loop(lambda: bus.subscribers) == 0


def test_timeout_then_recovers(agentd: Running) -> None:
    with agentd.client(timeout=0.2) as c:
        with pytest.raises(TransportError) as info:
            c.call("test.sleep", s=2)
        assert info.value.code == "E_TIMEOUT"
        assert c.call("ping") == "pong"  # reconnects with a fresh connection


def test_requests_on_one_connection_run_concurrently(agentd: Running) -> None:
    with agentd.raw() as s:
        s.send(encode_request(1, "test.sleep", {"s": 1.0}))
        s.send(encode_request(2, "ping"))
        first = decode_reply(s.recv(MAX_FRAME))
        assert (first.id, first.result) == (2, "pong")
        assert decode_reply(s.recv(MAX_FRAME)).id == 1


def test_many_concurrent_clients(agentd: Running) -> None:
    def worker(i: int) -> int:
        with agentd.client() as c:
            for _ in range(10):
                assert c.call("ping") == "pong"
                assert c.call("whoami")["pid"] == os.getpid()
            return int(c.call("test.sleep", s=0.05) * 100)

    with ThreadPoolExecutor(48) as pool:
        assert list(pool.map(worker, range(48))) == [5] * 48


def test_connection_limit(tmp_path: Path) -> None:
    def configure(d: Daemon) -> None:
        d.server.max_connections = 3

    r = start_daemon(tmp_path, configure)
    try:
        held = [r.client() for _ in range(3)]
        for c in held:
            assert c.call("ping") == "pong"
        extra = r.client()
        with pytest.raises(RemoteError) as info:
            extra.call("ping")
        assert info.value.code == "E_BUSY"
        extra.close()
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:
            try:
                with r.client() as c:
                    assert c.call("ping") == "pong"
                break
            except (RemoteError, TransportError):
                assert time.monotonic() < deadline
                time.sleep(0.02)
        for c in held:
            assert c.call("ping") == "pong"
            c.close()
    finally:
        r.stop()


def test_second_daemon_refuses_live_socket_and_replaces_stale_one(tmp_path: Path) -> None:
    r = start_daemon(tmp_path)
    try:
        other = Daemon(r.daemon.config, pidfile=tmp_path / "other.pid")
        with pytest.raises(AgentError) as info:
            asyncio.run(other.run(install_signals=False))
        assert info.value.code == "E_BUSY"
        assert r.client().call("ping") == "pong"
    finally:
        r.stop()
    # a stale socket file (nobody listening) is replaced
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(r.path))
    stale.close()
    assert r.path.exists()
    r2 = start_daemon(tmp_path)
    try:
        assert r2.client().call("ping") == "pong"
    finally:
        r2.stop()


def test_regular_file_at_socket_path_is_not_removed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "agentd.sock").write_text("precious")
    d = Daemon(AgentConfig(socket_path=run / "agentd.sock", run_dir=run))
    with pytest.raises(AgentError) as info:
        asyncio.run(d.run(install_signals=False))
    assert info.value.code == "E_BUSY"
    assert (run / "agentd.sock").read_text() == "precious"


def test_client_connect_errors(tmp_path: Path) -> None:
    with pytest.raises(ConnectError) as info:
        Client(tmp_path / "missing.sock").call("ping")
    assert info.value.code == "E_CONNECT" and info.value.hint
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(str(tmp_path / "stale.sock"))
    s.close()
    with pytest.raises(ConnectError) as info:
        Client(tmp_path / "stale.sock").call("ping")
    assert "nobody is listening" in info.value.message


def test_register_rejects_bad_and_duplicate_ops(tmp_path: Path) -> None:
    d = Daemon(AgentConfig(socket_path=tmp_path / "s", run_dir=tmp_path))
    with pytest.raises(ValueError):
        d.register("ping", _crash)
    with pytest.raises(ValueError):
        d.register("Bad Op", _crash)


# ------------------------------------------------------------------ found by the control fuzz
# (bench/fuzz.py, issue 10): each test reproduces what the fuzzer found.


def test_events_filters_are_bounded_and_not_cached_forever(agentd: Running) -> None:
    """A 60 KB glob blocked the loop for seconds (its regex compile); every distinct
    pattern stayed compiled in fnmatch's cache (32768 entries: megabytes of RSS)."""
    import fnmatch

    with agentd.client() as c:
        for name in ("kind", "channel", "cell"):
            t0 = time.monotonic()
            with pytest.raises(RemoteError) as info:
                c.call("events", **{name: "*a" * 30000})
            assert info.value.code == "E_ARGS" and name in info.value.message
            assert time.monotonic() - t0 < 5  # refused before any compile (functional bound)
        cached = fnmatch._compile_pattern.cache_info().currsize
        for i in range(300):
            c.call("events", kind=f"*{i:03d}*" + "x" * 40, channel="m*")
        assert fnmatch._compile_pattern.cache_info().currsize - cached < 300
        assert c.call("events", kind="*-features", n=5)[0]["kind"] == "kernel-features"
        assert [e["kind"] for e in c.call("events", kind="st?rted", channel="[l-n]aster")] \
            == ["started"]
        assert c.call("events", kind="x" * 64) == []  # 64 characters are fine


async def _block(peer: Peer, args: Mapping[str, Any]) -> Any:
    time.sleep(arg(args, "s", float, 0.5) or 0.0)  # blocks the loop, as a slow op would
    return "done"


def test_a_burst_of_connects_while_the_loop_is_busy_is_queued(tmp_path: Path) -> None:
    """listen(64) made the 65th connect of a burst fail at once with EAGAIN while the
    loop was busy: agentctl said `cannot connect`.  Now every one is queued, accepted
    and answered (pong, or E_BUSY above the connection limit)."""
    r = start_daemon(tmp_path, lambda d: d.register("test.block", _block))
    conns: list[socket.socket] = []
    try:
        blocker = r.raw()
        blocker.send(encode_request(1, "test.block", {"s": 1.0}))
        time.sleep(0.2)  # the loop is blocked now
        for _ in range(150):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(10)
            s.connect(str(r.path))  # raised BlockingIOError past the 64th
            conns.append(s)
        for i, s in enumerate(conns):
            s.send(encode_request(i + 1, "ping"))
        got = [decode_reply(s.recv(MAX_FRAME + 1)) for s in conns]
        assert all(x.result == "pong" or (x.error and x.error.code == "E_BUSY") for x in got)
        assert sum(1 for x in got if x.ok) >= 60
        assert decode_reply(blocker.recv(MAX_FRAME + 1)).result == "done"
        blocker.close()
    finally:
        for s in conns:
            s.close()
        r.stop()


def idle(r: Running) -> None:
    """Wait until the daemon has closed every connection (start_daemon's ping one too)."""
    deadline = time.monotonic() + 10
    while r.in_loop(lambda: r.daemon.server.connections):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_refused_connection_reads_its_request_into_a_small_buffer(tmp_path: Path) -> None:
    """E_BUSY carries the id of a short request; one longer than the small buffer read
    (a flood of refused connections must not cost 64 KiB each) is answered with id 0."""
    r = start_daemon(tmp_path, lambda d: setattr(d.server, "max_connections", 1))
    try:
        idle(r)
        with r.raw() as held:
            assert raw_call(held, encode_request(1, "ping")).result == "pong"
            with r.raw() as extra:
                reply = raw_call(extra, encode_request(41, "ping"))
                assert reply.error is not None and (reply.error.code, reply.id) == ("E_BUSY", 41)
            with r.raw() as extra:
                reply = raw_call(extra, encode_request(42, "ping", {"pad": "p" * 2000}))
                assert reply.error is not None and (reply.error.code, reply.id) == ("E_BUSY", 0)
    finally:
        r.stop()


def test_client_waits_while_the_backlog_is_full(tmp_path: Path) -> None:
    """A Unix socket says EAGAIN at once when the listener's backlog is full, even to a
    socket with a timeout: the client waits (up to its timeout), then says E_TIMEOUT."""
    path = tmp_path / "full.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(8):  # fill the backlog (its size is 0 or 1 depending on the kernel)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
        t0 = time.monotonic()
        with pytest.raises(TransportError) as info:
            Client(path, timeout=0.3).call("ping")
        assert info.value.code == "E_TIMEOUT" and time.monotonic() - t0 >= 0.3

        def accept_later() -> None:
            time.sleep(0.2)
            for _ in range(len(fillers) + 1):  # the fillers first, the client last
                conn, _ = listener.accept()
                conn.settimeout(0.5)
                fillers.append(conn)
                try:
                    if conn.recv(100):
                        conn.send(cbor2.dumps({"v": 1, "id": 1, "ok": True,
                                               "result": "pong"}))
                except TimeoutError:
                    continue

        t = threading.Thread(target=accept_later, daemon=True)
        t.start()
        assert Client(path, timeout=5).call("ping") == "pong"
        t.join(5)
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_refused_connection_that_leaves_at_once_is_not_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A connection over the limit that sends and closes before reading its E_BUSY logged
    a traceback (BrokenPipeError) each time: a storm of them flooded the log."""
    r = start_daemon(tmp_path, lambda d: setattr(d.server, "max_connections", 1))
    try:
        idle(r)
        with r.raw() as held:
            assert raw_call(held, encode_request(1, "ping")).result == "pong"
            for i in range(30):
                s = r.raw()
                s.send(encode_request(i + 2, "ping"))
                s.close()
            deadline = time.monotonic() + 10
            while r.in_loop(lambda: r.daemon.server.connections) > 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert raw_call(held, encode_request(99, "ping")).result == "pong"
    finally:
        r.stop()
    assert not [x for x in caplog.records if x.levelname == "ERROR"], caplog.text


async def _blob(peer: Peer, args: Mapping[str, Any]) -> Any:
    return "b" * 60_000


def test_a_client_that_stops_reading_is_dropped(tmp_path: Path) -> None:
    """A connection that asked for 16 big replies and never read them held them (about
    1 MiB of agentd's memory) and its slot for good; now a reply not taken within the
    send timeout closes it, while other clients are served all along."""
    def configure(d: Daemon) -> None:
        d.register("test.blob", _blob)
        d.server.send_timeout = 0.5

    r = start_daemon(tmp_path, configure)
    try:
        mute = r.raw()
        mute.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for i in range(40):
            mute.send(encode_request(i + 1, "test.blob"))
        with r.client() as c:
            assert c.call("ping") == "pong"
        deadline = time.monotonic() + 10
        while r.in_loop(lambda: r.daemon.server.connections):
            assert time.monotonic() < deadline, "the mute connection was never dropped"
            time.sleep(0.05)
        got = 0
        mute.settimeout(5)
        while mute.recv(MAX_FRAME + 1):  # what the kernel had taken, then the end
            got += 1
        assert got < 40
        mute.close()
        with r.client() as c:
            assert c.call("ping") == "pong"
    finally:
        r.stop()
