"""The package's layers (docs/architecture.md), enforced on every import of every module.

Each folder of ``agent/`` is a layer and may import only the layers its row names, the
pure core none but itself and a short list of the standard library; inside the daemon,
services never import each other, the server or another service's handlers (only
``main`` builds and wires them).  Every import counts: top-level, lazy (inside a
function) and ``TYPE_CHECKING`` ones, since a lazy import is still a dependency.

The security channels' pure modules (every module of ``agent/monitor/<channel>/`` except
those named ``adapter*`` and ``service*``) follow the core's rules: none of the banned
standard library, from ``os`` only what does no I/O, and of ours only the core and other
pure monitor modules.  The CLI may import those pure modules too (``agent-patterns``
compiles and checks pattern bundles on a build host).

The checker runs over the real tree and, to show it can fail, over a fixture tree with
one bad import of each kind.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# layer -> the layers (or single modules, dotted below agent) it may import
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset({"core"}),
    "kernel": frozenset({"core", "kernel"}),
    "monitor": frozenset({"core", "kernel", "monitor"}),
    "daemon": frozenset({"core", "kernel", "monitor", "daemon"}),
    # the CLI reads what it can without the daemon through the kernel probes only
    "cli": frozenset({"core", "cli", "kernel.probes", "kernel.cgroupdetect", "kernel.seal"}),
}
# The core does no I/O: no module of the standard library that talks to the kernel.
CORE_BANNED = frozenset({
    "asyncio", "ctypes", "fcntl", "mmap", "multiprocessing", "pty", "resource", "select",
    "selectors", "shutil", "signal", "socket", "subprocess", "tempfile", "termios",
    "threading", "cgroupspy", "pyroute2",
})
# ``os`` in the core: only names that do no I/O.
CORE_OS_NAMES = frozenset({"strerror"})
# Inside the daemon: what a service may import of the daemon (shared record and event
# types), and what a module owns: the server its control socket, each module of op
# handlers the service(s) it puts on the socket.  Only the builders (main, its channel
# half monitors, and __main__) import the rest: the server, and each service for the others.
DAEMON_SHARED = frozenset({"bus", "cells"})
DAEMON_OWNS = {"server": frozenset({"control"}), "cellapi": frozenset({"manager"}),
               "tunerapi": frozenset({"tuner", "reclaim"}),
               "manager": frozenset({"adoption", "driver"})}  # the manager's halves
DAEMON_BUILDERS = frozenset({"main", "monitors", "__main__"})  # monitors: main's channel half
# A channel's kernel-facing modules; every other module of agent/monitor/<channel>/ is pure.
MONITOR_IMPURE = ("adapter", "service")


def is_pure_monitor(rel: tuple[str, ...]) -> bool:
    """``monitor/<channel>/<module>.py`` (parts below agent/) that is not an adapter or a
    service: it must keep the core's rules."""
    return (len(rel) >= 3 and rel[0] == "monitor"
            and not rel[-1].removesuffix(".py").startswith(MONITOR_IMPURE))


def _pure_monitor_target(target: str, pkg: Path) -> bool:
    """An import target (``monitor.correlation.engine``) that is a pure monitor module
    (or a channel package, whose ``__init__`` is pure)."""
    parts = target.split(".")
    if len(parts) < 2 or parts[0] != "monitor":
        return False
    if len(parts) == 2:
        return (pkg / "monitor" / parts[1]).is_dir()
    return is_pure_monitor((*parts[:-1], parts[-1] + ".py"))


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: imports {self.imported}: {self.rule}"


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted name) of every import, also inside functions and if-blocks; for
    ``from a import b`` both ``a.b`` (it may be a module) and ``a``."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"line {node.lineno}: relative import; write agent.X")
            mod = node.module or ""
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def _agent_target(name: str, pkg: Path) -> str | None:
    """``agent.core.units.parse_size`` -> ``core.units`` (the module below agent)."""
    parts = name.split(".")
    if parts[0] != "agent" or len(parts) < 2:
        return None
    mod: list[str] = []
    for p in parts[1:]:
        here = pkg.joinpath(*mod, p)
        if here.is_dir() or here.with_suffix(".py").exists():
            mod.append(p)
        else:
            break
    return ".".join(mod) or None


def check_tree(pkg: Path) -> list[Violation]:
    """Every import of every module under ``pkg`` (an ``agent`` folder) against the rules."""
    found: list[Violation] = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg)
        if len(rel.parts) < 2:
            continue  # agent/__init__.py: the version only
        layer, leaf = rel.parts[0], path.stem
        shown = f"agent/{rel}"
        pure = layer == "core" or is_pure_monitor(rel.parts)
        who = "the core" if layer == "core" else "a pure monitor module"
        for line, name in _imports(ast.parse(path.read_text(), str(path))):
            top = name.split(".")[0]
            if pure and top in CORE_BANNED:
                found.append(Violation(shown, line, name, f"{who} does no I/O: no {top}"))
                continue
            if pure and top == "os" and name.removeprefix("os.") not in CORE_OS_NAMES:
                found.append(Violation(shown, line, name, f"{who} does no I/O: from os "
                                       "only " + ", ".join(sorted(CORE_OS_NAMES))))
                continue
            target = _agent_target(name, pkg)
            if target is None or name.startswith("agent.__version__"):
                continue
            tlayer = target.split(".")[0]
            if layer in ("monitor", "cli") and tlayer == "monitor" and (
                    _pure_monitor_target(target, pkg) or (layer == "monitor" and not pure)):
                continue  # pure monitor modules: for anyone above the core
            if is_pure_monitor(rel.parts) and tlayer != "core":
                found.append(Violation(
                    shown, line, name, "a pure monitor module may import only core and "
                    "pure monitor modules (no kernel, adapter* or service*)"))
                continue
            ok = ALLOWED.get(layer, frozenset())
            if tlayer not in ok and not any(target == m or target.startswith(m + ".")
                                            for m in ok if "." in m):
                found.append(Violation(shown, line, name,
                                       f"layer {layer} may import only {', '.join(sorted(ok))}"))
                continue
            if layer == "daemon" and tlayer == "daemon" and leaf not in DAEMON_BUILDERS:
                tmod = target.split(".")[1] if "." in target else ""
                own = DAEMON_OWNS.get(leaf, frozenset())
                if tmod and tmod != leaf and tmod not in DAEMON_SHARED | own:
                    found.append(Violation(
                        shown, line, name, "a daemon service imports no other service, the "
                        "server or their handlers (main wires them; shared: "
                        f"{', '.join(sorted(DAEMON_SHARED))})"))
    return found


def test_the_package_keeps_its_layers() -> None:
    bad = check_tree(REPO / "agent")
    assert not bad, "layer rule broken:\n" + "\n".join(map(str, bad))


def test_every_layer_has_its_docstring() -> None:
    for layer in ALLOWED:
        init = REPO / "agent" / layer / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init} must say what belongs there and what it imports"


def _write(root: Path, rel: str, text: str) -> None:
    p = root / "agent" / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


@pytest.fixture
def fixture_tree(tmp_path: Path) -> Path:
    for layer in ALLOWED:
        _write(tmp_path, f"{layer}/__init__.py", '"""x"""\n')
    _write(tmp_path, "__init__.py", "")
    _write(tmp_path, "core/units.py", "import re\nfrom os import strerror\n")
    _write(tmp_path, "kernel/net.py", "from agent.core.units import x\n")
    for name in ("bus", "server", "manager", "cellapi", "tunerapi"):
        _write(tmp_path, f"daemon/{name}.py", "")
    _write(tmp_path, "daemon/tuner.py", "from agent.daemon.bus import EventBus\n")
    _write(tmp_path, "daemon/main.py", "from agent.daemon.tuner import Tuner\n")
    _write(tmp_path, "cli/main.py", "from agent.kernel.probes import check\n")
    _write(tmp_path, "kernel/probes.py", "")
    # a channel: pure modules import the core and each other; its adapter and service
    # may do I/O and import the kernel; the CLI may use the pure modules
    _write(tmp_path, "monitor/exec/__init__.py", '"""x"""\n')
    _write(tmp_path, "monitor/exec/rules.py", "import re\nfrom os import strerror\n"
           "from agent.core.units import x\nfrom agent.monitor.exec.model import Rule\n")
    _write(tmp_path, "monitor/exec/model.py", "")
    _write(tmp_path, "monitor/exec/adapter.py", "import os\nimport socket\n"
           "from agent.kernel.net import HostNet\nfrom agent.monitor.exec.rules import f\n")
    _write(tmp_path, "monitor/exec/service_loop.py", "import asyncio\n"
           "from agent.monitor.exec.adapter import Fan\n")
    _write(tmp_path, "cli/tool.py", "from agent.monitor.exec.rules import check\n")
    _write(tmp_path, "daemon/cellapi.py", "from agent.monitor.exec.service_loop import S\n")
    return tmp_path / "agent"


def test_a_clean_fixture_passes(fixture_tree: Path) -> None:
    assert check_tree(fixture_tree) == []


@pytest.mark.parametrize(("rel", "text", "line", "rule"), [
    ("core/planner.py", '"""x"""\n\nfrom agent.kernel.net import veth_names\n', 3,
     "layer core may import only core"),
    ("core/plan.py", "def f():\n    from agent.daemon.bus import EventBus\n", 2,
     "layer core may import only core"),
    ("core/plan.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    from agent.kernel.journal import Journal\n", 3, "layer core may import only core"),
    ("core/budget.py", "import os\n", 1, "the core does no I/O"),
    ("core/budget.py", "from os import path\n", 1, "the core does no I/O"),
    ("core/budget.py", "import subprocess\n", 1, "the core does no I/O: no subprocess"),
    ("kernel/spawn.py", "from agent.daemon.spawner import CellSpawner\n", 1,
     "layer kernel may import only core, kernel"),
    ("daemon/reclaim.py", "from agent.daemon.tuner import Tuner\n", 1,
     "a daemon service imports no other service"),
    ("daemon/cellapi.py", "from agent.daemon import server\n", 1,
     "a daemon service imports no other service"),
    ("daemon/tunerapi.py", "from agent.daemon.manager import CellManager\n", 1,
     "a daemon service imports no other service"),
    ("daemon/manager.py", "def f():\n    from agent.daemon.cellapi import CellOps\n", 2,
     "a daemon service imports no other service"),
    ("cli/diag.py", "from agent.daemon.server import cgroup_mode\n", 1,
     "layer cli may import only"),
    ("cli/diag.py", "from agent.kernel.net import HostNet\n", 1, "layer cli may import only"),
    ("monitor/exec/adapter.py", "from agent.daemon.bus import EventBus\n", 1,
     "layer monitor may import only"),
    # the channels' pure modules keep the core's rules
    ("monitor/exec/rules.py", "import socket\n", 1, "a pure monitor module does no I/O: "
     "no socket"),
    ("monitor/correlation/engine.py", "def f():\n    import threading\n", 2,
     "a pure monitor module does no I/O: no threading"),
    ("monitor/correlation/bundle.py", "from os import path\n", 1,
     "a pure monitor module does no I/O: from os only strerror"),
    ("monitor/exec/__init__.py", "import asyncio\n", 1, "a pure monitor module does no I/O"),
    ("monitor/exec/rules.py", "from agent.kernel.net import HostNet\n", 1,
     "a pure monitor module may import only core and pure monitor modules"),
    ("monitor/exec/rules.py", "from agent.monitor.exec.adapter import Fan\n", 1,
     "a pure monitor module may import only core and pure monitor modules"),
    ("monitor/exec/rules.py", "from agent.daemon.bus import EventBus\n", 1,
     "a pure monitor module may import only core and pure monitor modules"),
    ("cli/tool.py", "from agent.monitor.exec.adapter import Fan\n", 1,
     "layer cli may import only"),
])
def test_a_bad_import_is_named(fixture_tree: Path, rel: str, text: str, line: int,
                               rule: str) -> None:
    _write(fixture_tree.parent, rel, text)
    bad = check_tree(fixture_tree)
    assert len(bad) == 1, bad
    v = bad[0]
    assert v.path == f"agent/{rel}" and v.line == line and rule in v.rule, str(v)
    assert f"agent/{rel}:{line}: imports" in str(v)
