"""agentctl against a real agentd started as a subprocess (``python -m agent.daemon``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent import __version__
from agent.cli.client import Client, ConnectError, TransportError
from agent.cli.main import format_event, format_status, main
from agent.core.errors import NotFoundError
from agent.core.protocol import Peer, decode_request, encode_reply
from agent.daemon.control import ControlServer, Dispatcher


class Agentd:
    def __init__(self, tmp: Path) -> None:
        self.socket = tmp / "run" / "agentd.sock"
        self.pidfile = tmp / "run" / "agentd.pid"
        self.log = tmp / "agentd.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.daemon", "--config", str(tmp / "none.toml"),
                 "--socket", str(self.socket), "--pidfile", str(self.pidfile),
                 "--state-dir", str(tmp / "state"), "--log-level", "debug"],
                stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while True:
            try:
                with Client(self.socket, 1) as c:
                    c.call("ping")
                return
            except ConnectError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agentd did not start:\n{self.log.read_text()}") from None
                time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)


@pytest.fixture(scope="module")
def agentd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agentd]:
    d = Agentd(tmp_path_factory.mktemp("agentd"))
    yield d
    d.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_status_human_and_json(agentd: Agentd, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "--socket", str(agentd.socket), "status")
    assert rc == 0 and err == ""
    assert out.startswith(f"agentd {__version__}  pid {agentd.proc.pid}  up ")
    assert "cgroup" in out and all(len(line) <= 80 for line in out.splitlines())
    rc, out, _ = run(capsys, "--socket", str(agentd.socket), "--json", "status")
    st = json.loads(out)
    assert rc == 0 and st["pid"] == agentd.proc.pid and st["cells"] == 0
    assert st["kernel"] == os.uname().release
    rc, out2, _ = run(capsys, "status", "--json", "--socket", str(agentd.socket))
    assert rc == 0 and json.loads(out2)["pid"] == agentd.proc.pid  # options after the command


def test_ping_and_events(agentd: Agentd, capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(agentd.socket)
    rc, out, _ = run(capsys, "--socket", sock, "ping")
    assert rc == 0 and out.startswith("pong (")
    rc, out, _ = run(capsys, "--socket", sock, "--json", "ping")
    assert rc == 0 and json.loads(out) == "pong"
    rc, out, _ = run(capsys, "--socket", sock, "--json", "events", "-n", "1")
    evs = json.loads(out)
    assert rc == 0 and len(evs) == 1 and evs[0]["kind"] == "started"
    assert evs[0]["attrs"]["pid"] == agentd.proc.pid
    rc, out, _ = run(capsys, "--socket", sock, "events")
    assert rc == 0 and " notice master " in out and "started" in out
    assert all(len(line) <= 80 for line in out.splitlines())
    rc, out, _ = run(capsys, "--socket", sock, "events", "--kind", "nomatch*")
    assert rc == 0 and out == ""
    rc, out, err = run(capsys, "--socket", sock, "events", "--persisted", "-f")
    assert rc == 2 and "E_USAGE" in err and out == ""
    rc, out, _ = run(capsys, "--socket", sock, "--json", "events", "--persisted", "-n", "5")
    assert rc == 0 and isinstance(json.loads(out), list)


def test_whoami_reports_the_calling_process(agentd: Agentd) -> None:
    code = ("from agent.cli.client import Client; import sys, os, json; "
            "print(json.dumps([Client(sys.argv[1]).call('whoami'), os.getpid()]))")
    out = subprocess.run([sys.executable, "-c", code, str(agentd.socket)], check=True,
                         capture_output=True, text=True).stdout
    peer, pid = json.loads(out)
    assert peer == {"uid": os.getuid(), "gid": os.getgid(), "pid": pid}
    assert pid != os.getpid()


def test_daemon_unreachable_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "--socket", str(tmp_path / "missing.sock"), "status")
    assert rc == 3 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith("agentctl: error[E_CONNECT]: ") and lines[1].startswith("hint: ")
    assert "Traceback" not in err
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    rc, _, err = run(capsys, "--socket", str(tmp_path / "stale.sock"), "ping")
    assert rc == 3 and "nobody is listening" in err
    rc, _, err = run(capsys, "--debug", "--socket", str(tmp_path / "missing.sock"), "ping")
    assert rc == 3 and "Traceback" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys)[0] == 2
    assert run(capsys, "events", "-n", "-1")[0] == 2
    assert run(capsys, "events", "-n", "lots")[0] == 2
    assert run(capsys, "--timeout")[0] == 2


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.strip() == f"agentctl {__version__}"
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "exit codes" in out and "checkconfig" in out
    res = subprocess.run([sys.executable, "-m", "agent.daemon", "--version"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == f"agentd {__version__}"


def test_checkconfig_delegates_or_explains(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        import agent.cli.checkconfig  # noqa: F401
    except ImportError:
        rc, _, err = run(capsys, "checkconfig", "--anything")
        assert rc == 1 and "error[E_UNAVAILABLE]" in err and "hint:" in err
    else:  # the real module exists: its own --help must work through agentctl
        rc, _, _ = run(capsys, "checkconfig", "--help")
        assert rc == 0


# ------------------------------------------------------------------ error paths


class Server:
    """A real ControlServer with handlers that fail in chosen ways, on its own loop."""

    def __init__(self, path: Path) -> None:
        self.dispatcher = Dispatcher()
        self.dispatcher.register("status", self._status)
        self.dispatcher.register("ping", self._slow)
        self.server = ControlServer(path, self.dispatcher)
        self.loop = asyncio.new_event_loop()
        self.server.bind()
        self.loop.run_until_complete(self.server.start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @staticmethod
    async def _status(peer: Peer, args: Mapping[str, Any]) -> Any:
        raise NotFoundError("E_NOCELL", "no cell `tv`", "list cells with agentctl cells")

    @staticmethod
    async def _slow(peer: Peer, args: Mapping[str, Any]) -> Any:
        await asyncio.sleep(5)
        return "pong"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def test_daemon_error_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    srv = Server(tmp_path / "s.sock")
    try:
        rc, out, err = run(capsys, "--socket", str(tmp_path / "s.sock"), "status")
        assert rc == 1 and out == ""
        assert err.splitlines() == ["agentctl: error[E_NOCELL]: no cell `tv`",
                                    "hint: list cells with agentctl cells"]
        rc, _, err = run(capsys, "--socket", str(tmp_path / "s.sock"), "events")
        assert rc == 1 and "error[E_UNKNOWN_OP]" in err
        rc, _, err = run(capsys, "--socket", str(tmp_path / "s.sock"), "--timeout", "0.2", "ping")
        assert rc == 4 and "error[E_TIMEOUT]" in err
    finally:
        srv.close()


def _serve_once(path: Path, answer: Callable[[bytes], bytes | None]
                ) -> tuple[socket.socket, threading.Thread]:
    """A one-connection server on ``path``: reads one request, sends ``answer(request)``
    (nothing if None; a client that gave up is no error)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            reply = answer(conn.recv(70000))
            if reply is not None:
                with contextlib.suppress(OSError):
                    conn.send(reply)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return listener, t


def test_garbage_reply_exits_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "g.sock"
    listener, t = _serve_once(path, lambda _: b"\xff\x00not cbor")
    try:
        rc, _, err = run(capsys, "--socket", str(path), "ping")
        assert rc == 4 and "error[E_PROTOCOL]" in err
    finally:
        t.join(5)
        listener.close()


def _pong_after(delay: float) -> Callable[[bytes], bytes]:
    def answer(frame: bytes) -> bytes:
        req = decode_request(frame)
        time.sleep(delay)
        return encode_reply(req.id, "pong")

    return answer


@pytest.mark.parametrize(("raised", "ok"), [(5.0, True), (None, True), (0.1, False)])
def test_a_timeout_changed_after_connecting_applies(tmp_path: Path, raised: float | None,
                                                    ok: bool) -> None:
    """A timeout raised after connecting (what ``agentctl run`` and ``stop`` do, to 60 s)
    applies to the open connection, not only to the next one."""
    listener, t = _serve_once(tmp_path / "s.sock", _pong_after(0.5))
    try:
        first = 5.0 if raised == 0.1 else 0.1  # the reply comes after 0.5 s
        with Client(tmp_path / "s.sock", timeout=first) as c:
            c.timeout = raised  # after connect, as agentctl run does
            if ok:
                assert c.call("ping") == "pong"
            else:
                with pytest.raises(TransportError) as ei:
                    c.call("ping")
                assert ei.value.code == "E_TIMEOUT"
    finally:
        t.join(5)
        listener.close()


# ------------------------------------------------------------------ daemon process


def test_sigterm_removes_socket_and_pidfile(tmp_path: Path) -> None:
    d = Agentd(tmp_path)
    assert d.pidfile.read_text().strip() == str(d.proc.pid)
    assert d.stop() == 0
    assert not d.socket.exists() and not d.pidfile.exists()
    log = d.log.read_text()
    assert "listening on" in log and "stopped" in log


def test_agentd_bad_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "agentd.toml"
    cfg.write_text('[network]\nvlan_min = "100"\n')
    res = subprocess.run([sys.executable, "-m", "agent.daemon", "--config", str(cfg)],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "`network.vlan_min`" in res.stderr and "hint:" in res.stderr
    res = subprocess.run([sys.executable, "-m", "agent.daemon", "--check",
                          "--config", str(tmp_path / "none.toml"), "--socket", "/tmp/x.sock"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and json.loads(res.stdout)["socket_path"] == "/tmp/x.sock"


# ------------------------------------------------------------------ formatting


def test_formatters_fit_80_columns() -> None:
    line = format_event({"ts": 1.5e9, "cell": "a-very-long-cell-name", "channel": "seccomp",
                         "kind": "trap", "severity": "alert",
                         "attrs": {"syscall": "mount", "args": list(range(40))}})
    assert len(line) == 80 and line.endswith("...") and "seccomp" in line and "trap" in line
    assert format_event({"ts": "bad"}).startswith("?")
    lines = format_status({"version": "1", "pid": 2, "uptime_s": 3725.2, "kernel": "k" * 200,
                           "machine": "aarch64", "cgroup": "v2", "cells": 4, "events": 5,
                           "tuner": {"enabled": True}})
    assert lines[0] == "agentd 1  pid 2  up 1h02m05s"
    assert all(len(x) <= 80 for x in lines) and lines[-1].startswith("tuner")


def test_status_budget_is_formatted_not_raw_json() -> None:
    mib = 1 << 20
    st = {"version": "0.1", "pid": 1, "uptime_s": 5, "budget": {
        "capacity": {"cpu_m": 1750, "memory": 900 * mib, "pids": 4000},
        "reserve": {"cpu_m": 250, "memory": 96 * mib, "pids": 256},
        "committed": {"cpu_m": 500, "memory": 64 * mib, "pids": 32},
        "free": {"cpu_m": 1000, "memory": 740 * mib, "pids": 3712},
        "states": {"running": 2, "stopped": 1}, "leases": 2}}
    lines = format_status(st)
    assert "  cpu     free 1000m of 1750m (host keeps 250m, cells hold 500m)" in lines
    assert "  memory  free 740.0 MiB of 900.0 MiB (host keeps 96.0 MiB, cells hold 64.0 MiB)" \
        in lines
    assert "  cells   2 running, 1 stopped" in lines and "  leases  2" in lines
    assert not any("{" in line for line in lines)
    # an unexpected shape is still shown, raw
    assert any(line.startswith("budget    ") for line in format_status({"budget": "n/a"}))


def test_status_tables_are_key_values_wrapped_not_raw_json() -> None:
    st = {"proc": {"events": 12345, "lost": 0, "cache": {"pids": 40, "misses": 3},
                   "wakeups": 123456, "slices": 77, "cells": ["a", "b"],
                   "many": list(range(9)), "rate": 0.25, "extra": "x" * 30}}
    lines = format_status(st)
    at = next(i for i, x in enumerate(lines) if x.startswith("proc "))
    block = lines[at:]
    assert block[0].startswith("proc      events=12345 lost=0 cache.pids=40 cache.misses=3")
    assert len(block) >= 2 and all(x.startswith(" " * 10) for x in block[1:])
    joined = " ".join(block)
    assert "cells=a,b" in joined and "many=[9]" in joined and "rate=0.25" in joined
    assert all(len(x) <= 80 for x in lines) and not any("{" in x for x in lines)
