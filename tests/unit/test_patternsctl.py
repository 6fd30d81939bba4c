"""``agentctl patterns`` against the correlation service's ops on a real control socket
(the service and a ControlServer on a loop of their own): list (in pages), install
(in chunks, a refusal as one error line), rollback; every line within 80 columns."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli.main import main
from agent.cli.patternsctl import CHUNK, format_patterns
from agent.core.policy import parse_policy
from agent.daemon.bus import EventBus
from agent.daemon.control import ControlServer, Dispatcher
from agent.monitor.correlation import bundle as bnd
from agent.monitor.correlation.language import parse
from agent.monitor.correlation.service import CorrelationService
from agent.monitor.correlation.service_ops import PatternOps
from agent.monitor.correlation.settings import parse_settings

SECRET = bytes(range(32))
PUB = bnd.public_key(SECRET)
POLICY = parse_policy('[[identity]]\nuid = 0\nrole = "admin"\n'
                      '[role.admin]\nservices = ["*"]\nmay = ["*"]\n')
TEXT = """
pattern two-step
  within 1m
  step a: test/one
  step b: test/two cell != a.cell and key == a.key
end
pattern counted
  step c: test/hit
  count 3 distinct cell within 1m
end
pattern master-poke
  tag master
  step p: agent/signal
end
"""


def write(path: Path, text: str, version: int) -> Path:
    data = bnd.stamp(bnd.encode(parse(text), version), bnd.key_id(PUB))
    path.write_bytes(data)
    path.with_name(path.name + ".sig").write_bytes(bnd.sign(data, SECRET))
    return path


class Agent:
    """The correlation service and its ops behind a real control socket."""

    def __init__(self, tmp: Path) -> None:
        (tmp / "keys").mkdir()
        (tmp / "keys" / "dev.pub").write_text(bnd.key_text("public", PUB))
        write(tmp / "default.bundle", TEXT, 2)
        settings = parse_settings({"keys_dir": str(tmp / "keys"),
                                   "bundle": str(tmp / "default.bundle")}, tmp / "state")
        self.bus = EventBus()
        self.svc = CorrelationService(self.bus, settings, policy=POLICY)
        d = Dispatcher()
        for op, h in PatternOps(self.svc).handlers().items():
            d.register(op, h)
        self.socket = tmp / "agentd.sock"
        self.server = ControlServer(self.socket, d)
        self.loop = asyncio.new_event_loop()
        self.server.bind()
        self.loop.run_until_complete(self.server.start())
        self.loop.run_until_complete(self.svc.start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.svc.close(), self.loop).result(5)
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path)
    yield a
    a.close()


def ctl(agent: Agent, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["--socket", str(agent.socket), *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_install_rollback(agent: Agent, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = ctl(agent, capsys, "patterns")
    assert rc == 0 and out.startswith("patterns version 2  signer " + bnd.key_id(PUB))
    assert "two-step" in out and all(len(x) <= 80 for x in out.splitlines())
    many = TEXT + "".join(f"pattern gen-{i}\n  about generated number {i}\n"
                          f"  step s: test/k{i}\nend\n" for i in range(800))
    big = write(tmp_path / "big.bundle", many, 3)
    assert big.stat().st_size > 2 * CHUNK  # several requests
    rc, out, err = ctl(agent, capsys, "patterns", "install", str(big))
    assert rc == 0, err
    assert out.splitlines() == [f"loaded version 3, signed by {bnd.key_id(PUB)}",
                                "803 patterns: 3 kept, 800 added, 0 changed, 0 removed"]
    rc, out, _ = ctl(agent, capsys, "--json", "patterns")
    d = json.loads(out)
    assert d["version"] == 3 and len(d["patterns"]) == d["total"] == 803
    rc, out, _ = ctl(agent, capsys, "patterns", "--name", "gen-7")
    assert rc == 0 and "  generated number 7" in out.splitlines()
    bad = write(tmp_path / "bad.bundle", TEXT, 4)
    bad.write_bytes(bad.read_bytes() + b"\x00")
    rc, out, err = ctl(agent, capsys, "patterns", "install", str(bad))
    assert rc == 1 and out == ""
    assert err.startswith("agentctl: error[E_BUNDLE_SIGNATURE]: ")
    rc, out, err = ctl(agent, capsys, "patterns", "install", str(tmp_path / "missing.bundle"))
    assert rc == 1 and "error[E_IO]" in err
    rc, out, _ = ctl(agent, capsys, "patterns", "rollback")
    assert rc == 0 and out.strip() == "rolled back to version 2 (3 patterns)"
    rc, _, err = ctl(agent, capsys, "patterns", "rollback")
    assert rc == 1 and "error[E_BUNDLE_ROLLBACK]" in err
    kinds = [(e.kind, e.attrs.get("version") or e.attrs.get("reason"))
             for e in agent.bus.recent(None, channel="correlation")]
    assert kinds == [("bundle-loaded", 2), ("bundle-loaded", 3),
                     ("bundle-refused", "E_BUNDLE_SIGNATURE"), ("bundle-loaded", 2),
                     ("bundle-refused", "E_BUNDLE_ROLLBACK")]


def test_format_fits_80_columns() -> None:
    d = {"version": 2024120701, "signer": "0123456789abcdef", "engine": 1, "previous": None,
         "origin": "/var/lib/agent/patterns/incoming/" + "x" * 80, "events": 10 ** 9,
         "total": 1, "patterns": [{"name": "p" * 64, "severity": "notice",
                                   "response": "isolate", "steps": 16, "matches": 10 ** 8,
                                   "partials": 256, "tags": ["t" * 60] * 16}],
         "alerts": [{"ts": 1.7e9, "severity": "alert", "pattern": "p" * 64,
                     "response": "freeze", "cells": ["a" * 40, None]}],
         "problems": ["no pinned key in /etc/agent/keys: no bundle can be loaded"]}
    lines = format_patterns(d)
    assert all(len(x) <= 80 for x in lines) and len(lines) == 8
    assert lines[-1].startswith("problem: no pinned key")
