"""The master defends itself (issue 12, item 5): a match of a pattern tagged ``master``
respawns it (``hook_master_attack``), and its installed files are watched against their
seal (``IntegrityWatch``, real inotify in a temporary tree): a change is an
``agent/integrity`` alert and a respawn request, which the seal check refuses while the
files differ.  The exec is the Respawner's seam (it fails, as an exec that cannot run:
the master goes on); everything else is the real bus, engine, library and kernel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.core.config import AgentConfig
from agent.core.events import Event
from agent.daemon import respawn as respawn_mod
from agent.daemon.bus import EventBus
from agent.daemon.integrity import IntegrityWatch
from agent.daemon.main import hook_master_attack, wire_integrity
from agent.daemon.respawn import RETRY_S, Respawner
from agent.daemon.server import Daemon
from agent.kernel.seal import seal_tree
from agent.monitor.correlation import bundle as bnd
from agent.monitor.correlation.language import parse
from agent.monitor.correlation.service import CorrelationService
from agent.monitor.correlation.settings import parse_settings

SECRET = bytes(range(32))
PATTERNS = """
pattern two-step
  severity alert
  within 1m
  step a: test/one
  step b: test/two cell != a.cell
end
pattern master-signalled
  severity alert
  response stop
  tag master
  step sig: agent/signal sender_pid != 1
end
"""


def sealed_tree(root: Path) -> Path:
    """A small installed package and its seal beside it; the seal's path."""
    pkg = root / "pkg" / "agent"
    (pkg / "daemon" / "__pycache__").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '1'\n")
    (pkg / "daemon" / "main.py").write_text("def main(argv): return 0\n")
    (pkg / "daemon" / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\x00" * 64)
    seal = root / "share" / "agent.seal"
    seal.parent.mkdir()
    seal.write_text(seal_tree(pkg).text())
    return seal


def respawner(bus: EventBus, root: Path, seal: Path) -> tuple[Respawner, list[Any]]:
    calls: list[Any] = []

    def execve(path: str, argv: list[str], env: Mapping[str, str]) -> None:
        calls.append(argv)
        raise OSError(8, "Exec format error")

    r = Respawner(bus, ["--socket", "/run/x"], package_root=root / "pkg", seal_path=seal,
                  policy_check=lambda peer: None, execve=execve, interpreter="/usr/bin/py")
    return r, calls


def correlation(bus: EventBus, tmp: Path) -> CorrelationService:
    keys, ship = tmp / "keys", tmp / "ship"
    keys.mkdir()
    ship.mkdir()
    (keys / "dev.pub").write_text(bnd.key_text("public", bnd.public_key(SECRET)))
    data = bnd.stamp(bnd.encode(parse(PATTERNS), 2),
                     bnd.key_id(bnd.public_key(SECRET)))
    (ship / "default.bundle").write_bytes(data)
    (ship / "default.bundle.sig").write_bytes(bnd.sign(data, SECRET))
    return CorrelationService(bus, parse_settings(
        {"keys_dir": str(keys), "bundle": str(ship / "default.bundle")}, tmp / "state"))


async def until(cond: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def kinds(bus: EventBus, channel: str) -> list[str]:
    return [e.kind for e in bus.recent(channel=channel)]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


# ---------------------------------------------------------------------- the pattern hook
def test_a_master_pattern_respawns_the_master_once_after_its_alert(tmp_path: Path) -> None:
    async def scenario() -> None:
        bus = EventBus()
        seal = sealed_tree(tmp_path)
        r, calls = respawner(bus, tmp_path, seal)
        svc = correlation(bus, tmp_path)
        await svc.start()
        hook_master_attack(svc, r)
        # The control: a pattern that is not about the master alerts, and that is all.
        bus.emit("test", "one", cell="a")
        bus.emit("test", "two", cell="b")
        await until(lambda: bus.recent(channel="correlation", kind="alert"), "the alert")
        await asyncio.sleep(0.2)
        assert calls == [] and r.requests == 0
        # The attack: three signals in a burst (one respawn, the others join it).
        for pid in (77, 78, 79):
            bus.emit("agent", "signal", sig=15, sender_pid=pid)
        await until(lambda: calls, "the exec")
        await asyncio.sleep(0.2)
        assert len(calls) == 1 and r.requests == 3
        assert calls[0][1:4] == ["-I", "-c", calls[0][3]]
        (resp,) = bus.recent(channel="master", kind="respawn")
        assert resp.attrs["reason"] == "pattern"
        assert resp.attrs["pattern"] == "master-signalled" and resp.attrs["cells"] == [None]
        first_attack = bus.recent(channel="correlation", kind="master-attack")[0]
        assert first_attack.attrs["hooked"] is True
        assert first_attack.seq < resp.seq  # the alert is out (and persisted) first
        assert kinds(bus, "master") == ["respawn", "respawn-failed"]
        await svc.close()

    run(scenario)


def test_a_master_pattern_with_tampered_files_is_an_alert_and_no_exec(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(respawn_mod, "RETRY_S", 0.5)

    async def scenario() -> None:
        bus = EventBus()
        seal = sealed_tree(tmp_path)
        (tmp_path / "pkg/agent/daemon/main.py").write_text("import os; os.system('x')\n")
        r, calls = respawner(bus, tmp_path, seal)
        svc = correlation(bus, tmp_path)
        await svc.start()
        hook_master_attack(svc, r)
        bus.emit("agent", "signal", sig=9, sender_pid=66)
        await until(lambda: bus.recent(channel="master", kind="integrity"), "the refusal")
        (ev,) = bus.recent(channel="master", kind="integrity")
        assert ev.severity == "alert" and ev.attrs["files"] == ["daemon/main.py (changed)"]
        assert calls == [] and r.respawns == 0
        # An attack that keeps firing costs one check per RETRY_S, not one per event;
        # a request within it is deferred to its end, not dropped.
        bus.emit("agent", "signal", sig=9, sender_pid=67)
        bus.emit("agent", "signal", sig=9, sender_pid=68)
        await asyncio.sleep(0.1)
        assert len(bus.recent(channel="master", kind="integrity")) == 1
        await until(lambda: len(bus.recent(channel="master", kind="integrity")) == 2,
                    "the deferred check")
        await asyncio.sleep(0.7)
        assert len(bus.recent(channel="master", kind="integrity")) == 2 and calls == []
        assert RETRY_S >= 1  # the shipped wait
        await svc.close()

    run(scenario)


def test_without_the_correlation_service_there_is_nothing_to_hook(tmp_path: Path) -> None:
    r, _calls = respawner(EventBus(), tmp_path, tmp_path / "none.seal")
    hook_master_attack(None, r)  # correlation disabled: no error, no hook
    assert r.requests == 0


# ---------------------------------------------------------------------- the integrity watch
def integrity(bus: EventBus) -> list[Event]:
    return bus.recent(channel="agent", kind="integrity")


def test_a_changed_installed_file_is_an_alert_and_a_refused_respawn(tmp_path: Path) -> None:
    async def scenario() -> None:
        seal = sealed_tree(tmp_path)
        d = Daemon(AgentConfig(socket_path=tmp_path / "s", run_dir=tmp_path))
        r, calls = respawner(d.bus, tmp_path, seal)
        watch = wire_integrity(d, r)
        watch.settle_s = 0.05
        await watch.start()
        await until(lambda: watch.checks == 1, "the first check")
        assert integrity(d.bus) == [] and watch.status()["watching"]
        main = tmp_path / "pkg/agent/daemon/main.py"
        # The control: a file rewritten with the same bytes is checked, not reported.
        main.write_text(main.read_text())
        await until(lambda: watch.checks == 2, "the check after a rewrite")
        assert integrity(d.bus) == [] and r.requests == 0
        # The attack: the installed code changes on disk.
        main.write_text("import os; os.system('evil')\n")
        await until(lambda: integrity(d.bus), "the integrity alert")
        (ev,) = integrity(d.bus)
        assert ev.severity == "alert" and ev.cell is None
        assert ev.attrs == {"path": str(main), "reason": "changed", "count": 1}
        await until(lambda: d.bus.recent(channel="master", kind="integrity"), "the respawn")
        (refused,) = d.bus.recent(channel="master", kind="integrity")
        assert refused.attrs["reason"] == "integrity" and calls == []
        assert d._status["integrity"]()["differences"] == ["daemon/main.py (changed)"]
        await watch.close()

    run(scenario)


def test_new_dirs_restores_and_tampering_while_down_are_seen(tmp_path: Path) -> None:
    async def scenario() -> None:
        bus = EventBus()
        seal = sealed_tree(tmp_path)
        pyc = tmp_path / "pkg/agent/daemon/__pycache__/main.cpython-311.pyc"
        good = pyc.read_bytes()
        pyc.write_bytes(b"evil")  # while agentd was down
        tampered: list[int] = []
        watch = IntegrityWatch(bus, tmp_path / "pkg/agent", seal, settle_s=0.05,
                               on_tamper=lambda bad: tampered.append(len(bad)))
        await watch.start()
        await until(lambda: integrity(bus), "the start check's alert")
        assert integrity(bus)[0].attrs["reason"] == "changed" and tampered == [1]
        pyc.write_bytes(good)  # restored: nothing new, forgotten
        await until(lambda: watch.checks == 2 and not watch.differences, "the restore")
        assert len(integrity(bus)) == 1 and tampered == [1]
        # A new package directory (watched from now on), then a module dropped into it.
        (tmp_path / "pkg/agent/extra").mkdir()
        await asyncio.sleep(0.3)
        (tmp_path / "pkg/agent/extra/hook.py").write_text("print('x')\n")
        await until(lambda: len(integrity(bus)) == 2, "the unsealed module")
        assert integrity(bus)[1].attrs["reason"] == "unsealed"
        assert integrity(bus)[1].attrs["path"].endswith("extra/hook.py")
        # The same file tampered again after a restore is reported again.
        pyc.write_bytes(b"evil")
        await until(lambda: len(integrity(bus)) == 3, "the second tampering")
        assert integrity(bus)[2].attrs["reason"] == "changed" and tampered == [1, 1, 2]
        # A mode change alone is a difference too (the seal keeps modes).
        (tmp_path / "pkg/agent/__init__.py").chmod(0o666)
        await until(lambda: len(integrity(bus)) == 4, "the mode change")
        assert integrity(bus)[3].attrs["reason"] == "mode"
        await watch.close()

    run(scenario)


def test_without_a_seal_nothing_is_watched(tmp_path: Path) -> None:
    async def scenario() -> None:
        bus = EventBus()
        watch = IntegrityWatch(bus, tmp_path, tmp_path / "agent.seal")
        await watch.start()
        assert not watch.status()["watching"] and "no seal" in str(watch.problem)
        await watch.close()

    run(scenario)
