"""The master's respawn with a real agentd (issue 12): ``respawn`` re-executes the
installed agent in the same process, which keeps its pid, its instance lock and its
control socket (a client's next request is answered by the new master, none refused),
and the respawn is an event that survives it (the persistent event log)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli.client import Client, ConnectError, RemoteError, TransportError
from agent.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def _call(sock: Path, op: str, **args: object) -> object:
    deadline = time.monotonic() + 30
    while True:
        try:
            with Client(sock, 5) as c:
                return c.call(op, **args)
        except (ConnectError, TransportError):
            assert time.monotonic() < deadline, f"no answer to {op}"
            time.sleep(0.05)


def test_respawn_keeps_pid_lock_and_socket_and_records_itself(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[[identity]]\nuid = 0\nrole = "admin"\n'
                      '[role.admin]\nservices = ["*"]\nmay = ["*"]\nprivileged_ops = []\n')
    config = tmp_path / "agentd.toml"
    config.write_text(f'policy_path = "{policy}"\n')
    sock, state, log = tmp_path / "agentd.sock", tmp_path / "state", tmp_path / "agentd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.daemon", "--config", str(config), "--socket",
             str(sock), "--pidfile", str(tmp_path / "pid"), "--state-dir", str(state),
             "--no-cells"], stdout=out, stderr=out, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        before = _call(sock, "status")
        assert isinstance(before, dict) and before["pid"] == proc.pid
        inode = sock.stat().st_ino
        assert _call(sock, "respawn") == {"respawning": True, "pid": proc.pid}

        def respawned() -> dict[str, object] | None:
            s = _call(sock, "status")
            assert isinstance(s, dict)
            return s if s["event_bus"]["boot"] != before["event_bus"]["boot"] else None

        deadline = time.monotonic() + 60
        while (after := respawned()) is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert after["pid"] == proc.pid and sock.stat().st_ino == inode
        kept = [e for e in _call(sock, "events.log", n=50)  # type: ignore[union-attr]
                if e["kind"] == "respawn"]
        assert kept and kept[-1]["boot"] == before["event_bus"]["boot"]
        assert kept[-1]["attrs"]["kept"] == ["control", "lock"]
        # the lock is still held: a second agentd on the state dir is refused
        second = subprocess.run(
            [sys.executable, "-m", "agent.daemon", "--config", str(config), "--socket",
             str(tmp_path / "other.sock"), "--state-dir", str(state), "--no-cells"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert second.returncode == 1 and "E_BUSY" in second.stderr + second.stdout
        assert "respawned: inherited lock, control" in log.read_text()
        # the same through agentctl: the respawn as persisted, and the seal check
        rc = main(["--socket", str(sock), "events", "--persisted", "--kind", "respawn"])
        shown = capsys.readouterr().out
        assert rc == 0 and " master " in shown and "respawn" in shown and "operator" in shown
        rc = main(["--socket", str(sock), "respawn", "--check"])
        assert rc == 0 and "no seal installed" in capsys.readouterr().out  # a source tree
    finally:
        proc.terminate()
        proc.wait(20)


def test_respawn_needs_the_policy(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[[identity]]\nuid = 0\nrole = "viewer"\n'
                      '[role.viewer]\nservices = ["*"]\nmay = ["status"]\n')
    config = tmp_path / "agentd.toml"
    config.write_text(f'policy_path = "{policy}"\n')
    sock = tmp_path / "agentd.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.daemon", "--config", str(config), "--socket", str(sock),
         "--pidfile", str(tmp_path / "pid"), "--state-dir", str(tmp_path / "state"),
         "--no-cells"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        _call(sock, "status")
        with pytest.raises(RemoteError) as info, Client(sock, 5) as c:
            c.call("respawn")
        assert info.value.code == "E_POLICY_OP"
    finally:
        proc.terminate()
        proc.wait(20)
