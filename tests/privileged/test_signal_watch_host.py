"""A real agentd (--no-cells) and signals it never expects: each is agent/signal with its
sender, and none ends it; SIGTERM still stops it in order (the control)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from test_single_instance import Agentd

from agent.cli.client import Client


def test_a_stray_signal_is_reported_and_agentd_keeps_serving(tmp_path: Path) -> None:
    sock, pidfile = tmp_path / "agentd.sock", tmp_path / "agentd.pid"
    agentd = Agentd(tmp_path, "agentd", tmp_path / "state", sock, pidfile, "--no-cells")
    try:
        agentd.wait_serving()
        for sig in (signal.SIGUSR1, signal.SIGHUP):
            os.kill(agentd.pid, sig)
        deadline = time.monotonic() + 30
        while True:
            with Client(sock, 5) as c:
                got = c.call("events", n=50, channel="agent", kind="signal")
            if len(got) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert sorted(e["attrs"]["sig"] for e in got) == ["SIGHUP", "SIGUSR1"]
        assert all(e["attrs"]["sender_pid"] == os.getpid() and e["severity"] == "alert"
                   and e["attrs"]["uid"] == os.getuid() for e in got)
        assert agentd.proc.poll() is None  # the default action of both would end it
        with Client(sock, 5) as c:
            assert c.call("ping") == "pong"
    finally:
        agentd.stop()  # SIGTERM: the orderly stop, not watched
    assert agentd.proc.returncode == 0 and not sock.exists()
