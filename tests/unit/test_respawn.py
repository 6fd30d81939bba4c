"""agent.daemon.respawn: tampered code is never executed; what is kept is named and
passed; a failed exec leaves the old master serving."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.daemon.bus import EventBus
from agent.daemon.respawn import BOOT, Respawner
from agent.kernel.inherit import ENV
from agent.kernel.seal import seal_tree


def _tree(root: Path) -> None:
    (root / "agent/daemon").mkdir(parents=True)
    (root / "agent/__init__.py").write_text("__version__ = '1'\n")
    (root / "agent/daemon/main.py").write_text("def main(argv): return 0\n")


def _respawner(tmp: Path, seal: Path | None) -> tuple[Respawner, list[Any], EventBus]:
    bus, calls = EventBus(), []

    def execve(path: str, argv: list[str], env: Mapping[str, str]) -> None:
        calls.append((path, argv, dict(env)))
        raise OSError(8, "Exec format error")

    r = Respawner(bus, ["--socket", "/run/x"], package_root=tmp, seal_path=seal,
                  policy_check=lambda peer: None, execve=execve, interpreter="/usr/bin/py")
    return r, calls, bus


def test_a_tampered_install_is_not_executed(tmp_path: Path) -> None:
    _tree(tmp_path)
    seal = tmp_path / "agent.seal"
    seal.write_text(seal_tree(tmp_path / "agent").text())
    (tmp_path / "agent/daemon/main.py").write_text("import os; os.system('evil')\n")
    r, calls, bus = _respawner(tmp_path, seal)
    r.respawn("operator")
    assert calls == [] and r.respawns == 0
    (ev,) = bus.recent(kind="integrity")
    assert ev.severity == "alert" and ev.attrs["files"] == ["daemon/main.py (changed)"]


def test_an_intact_install_is_executed_with_what_is_kept(tmp_path: Path) -> None:
    _tree(tmp_path)
    seal = tmp_path / "agent.seal"
    seal.write_text(seal_tree(tmp_path / "agent").text())
    r, calls, bus = _respawner(tmp_path, seal)
    r.keep(lambda: {"control": 0})  # fd 0 stands in: prepare only marks it inheritable
    r.respawn("pattern", pattern="agent-socket-probe")
    ((path, argv, env),) = calls
    assert path == "/usr/bin/py" and argv[:4] == ["/usr/bin/py", "-I", "-c", BOOT]
    assert argv[4:] == [str(tmp_path), "--socket", "/run/x"]
    assert '"control": 0' in env[ENV]
    kinds = [e.kind for e in bus.recent(channel="master")]
    assert kinds == ["respawn", "respawn-failed"]  # the exec failed: the master goes on
    assert bus.recent(kind="respawn")[0].attrs["pattern"] == "agent-socket-probe"


def test_without_a_seal_nothing_is_checked(tmp_path: Path) -> None:
    _tree(tmp_path)
    r, calls, _bus = _respawner(tmp_path, tmp_path / "missing.seal")
    assert r.check() is None
    r.respawn("operator")
    assert len(calls) == 1
