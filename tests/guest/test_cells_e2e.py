"""Cells end to end in the box: agentctl -> agentd (started by S50agentd) -> real cells.

Every test compares what the agent may leave behind (cgroup leaves, links, bridge VLAN
entries, pinned netns, cell run dirs) before and after, and leaves agentd running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CG = Path("/sys/fs/cgroup/agent")
NETNS = Path("/run/netns")
RUN_CELLS = Path("/run/agent/cells")
PIDFILE = Path("/var/run/agentd.pid")
LOG = Path("/var/log/agentd.log")
SERVICES = Path("/etc/agent/services")


def sh(*argv: str, check: bool = True, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, cwd="/", timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{argv} exited {r.returncode}: {r.stdout}{r.stderr}\n"
                             f"--- agentd log ---\n{log_tail()}")
    return r


def log_tail(n: int = 40) -> str:
    try:
        return "\n".join(LOG.read_text().splitlines()[-n:])
    except OSError:
        return "(no log)"


def ctl(*args: str) -> Any:
    return json.loads(sh("agentctl", "--json", *args).stdout)


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n--- agentd log ---\n{log_tail()}")


def ps() -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in ctl("ps")}


def leftovers() -> dict[str, Any]:
    """What cells may leave behind: everything here must be as before, VLAN gateways
    (agbr0.N and the bridge's own `vid N self`) included."""
    links = sorted(p.name for p in Path("/sys/class/net").iterdir())
    vlans = json.loads(subprocess.run(
        ["bridge", "-j", "vlan", "show"], capture_output=True, text=True).stdout or "[]")
    return {"cgroups": sorted(p.name for p in CG.iterdir() if p.is_dir()) if CG.exists()
            else [],
            "links": links, "vlans": vlans,
            "netns": sorted(p.name for p in NETNS.iterdir()) if NETNS.exists() else [],
            "run": sorted(p.name for p in RUN_CELLS.iterdir()) if RUN_CELLS.exists() else []}


def agentd_pid() -> int:
    return int(PIDFILE.read_text().strip())


def ensure_agentd() -> None:
    r = sh("agentctl", "ping", check=False)
    if r.returncode != 0:
        sh("/etc/init.d/S50agentd", "start")
        wait_for(lambda: sh("agentctl", "ping", check=False).returncode == 0, "agentd ping")


def kill9_and_restart() -> None:
    pid = agentd_pid()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists()
             or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], "agentd to die")
    sh("/etc/init.d/S50agentd", "start")
    wait_for(lambda: sh("agentctl", "ping", check=False).returncode == 0, "agentd restarted")


@pytest.fixture
def clean() -> Iterator[dict[str, Any]]:
    ensure_agentd()
    before = leftovers()
    yield before
    ensure_agentd()
    for name in ps():
        sh("agentctl", "stop", name, check=False)
    assert leftovers() == before


def http_get(address: str, port: int = 8080) -> str:
    with urllib.request.urlopen(f"http://{address}:{port}/", timeout=10) as r:
        return str(r.read().decode())


def test_oneshot_output_kept_and_cell_destroyed(clean: dict[str, Any]) -> None:
    out = ctl("run", "demo-echo")
    assert out["name"] == "demo-echo"
    wait_for(lambda: "demo-echo" not in ps(), "demo-echo to be destroyed")
    lines = [x["line"] for x in ctl("logs", "demo-echo")["lines"]]
    assert "hello from a cell" in lines
    assert not (CG / "demo-echo").exists()
    assert not (NETNS / "cell-demo-echo").exists()
    kinds = [e["kind"] for e in ctl("events", "-n", "50", "--cell", "demo-echo")]
    assert {"running", "destroying", "destroyed"} <= set(kinds)


def test_web_cell_serves_and_stop_frees_everything(clean: dict[str, Any]) -> None:
    out = ctl("run", "demo-web")
    assert out["state"] == "running" and out["vlan"] == 100
    row = ps()["demo-web"]
    assert row["state"] == "running" and row["vlan"] == 100 and row["address"]
    assert row["pids"] >= 1 and row["memory_max"] == 32 << 20
    assert "<" in http_get(row["address"])  # /www/index.html through VLAN 100's gateway
    assert (CG / "demo-web").is_dir() and (NETNS / "cell-demo-web").exists()
    assert int((CG / "demo-web" / "pids.max").read_text()) == 32
    info = ctl("inspect", "demo-web")
    assert info["allocation"]["vlan"] == 100 and info["plan"][0].startswith("plan ")
    assert any(r[0] == "sethostname" for r in info["seccomp"])
    human = sh("agentctl", "ps").stdout.splitlines()
    assert len(human) == 2 and all(len(x) <= 80 for x in human)
    done = ctl("stop", "demo-web")
    assert done["state"] == "destroyed"
    assert "demo-web" not in ps()
    assert leftovers() == clean
    refused = sh("agentctl", "stop", "demo-web", check=False)
    assert refused.returncode == 1 and "E_NOT_FOUND" in refused.stderr


def test_refusals_have_codes(clean: dict[str, Any]) -> None:
    r = sh("agentctl", "run", "no-such-service", check=False)
    assert r.returncode == 1 and "E_NOT_FOUND" in r.stderr
    r = sh("agentctl", "run", "../etc/passwd", check=False)
    assert r.returncode == 1 and "E_CELL_NAME" in r.stderr
    (SERVICES / "e2e-huge.toml").write_text(
        'name = "e2e-huge"\n[service]\ncommand = "/bin/busybox"\nargs = ["true"]\n'
        '[image]\nroot = "/usr/share/agent/images/demo"\n'
        '[resources]\nmemory_min = "60G"\nmemory_max = "60G"\n')
    try:
        r = sh("agentctl", "run", "e2e-huge", check=False)
        assert r.returncode == 1 and "E_ADMISSION_MEMORY" in r.stderr, r.stderr
    finally:
        (SERVICES / "e2e-huge.toml").unlink()


def test_seccomp_trap_is_answered_eperm_and_published(clean: dict[str, Any]) -> None:
    (SERVICES / "e2e-trap.toml").write_text(
        'name = "e2e-trap"\n[service]\ncommand = "/bin/busybox"\n'
        'args = ["hostname", "evil"]\n[image]\nroot = "/usr/share/agent/images/demo"\n'
        '[lifecycle]\nmode = "oneshot"\nrestart = "no"\n')
    try:
        ctl("run", "e2e-trap")
        wait_for(lambda: "e2e-trap" not in ps(), "e2e-trap to be destroyed")
        traps = ctl("events", "-n", "20", "--channel", "seccomp", "--cell", "e2e-trap")
        assert any(t["attrs"]["syscall"] == "sethostname" for t in traps), traps
        lines = " ".join(x["line"] for x in ctl("logs", "e2e-trap")["lines"])
        assert "not permitted" in lines.lower(), lines
    finally:
        (SERVICES / "e2e-trap.toml").unlink()


def test_kill9_agentd_then_restart_adopts_running_cell(clean: dict[str, Any]) -> None:
    ctl("run", "demo-web")
    row = ps()["demo-web"]
    kill9_and_restart()
    again = ps()["demo-web"]
    assert again["state"] == "running" and again["pid"] == row["pid"]
    assert again["address"] == row["address"]
    assert "<" in http_get(row["address"])
    kinds = [e["kind"] for e in ctl("events", "-n", "50", "--cell", "demo-web")]
    assert "adopted" in kinds
    ctl("stop", "demo-web")
    assert leftovers() == clean


@pytest.mark.parametrize("delay", [0.15, 0.4, 0.8])
def test_kill9_during_creation_is_repaired(clean: dict[str, Any], delay: float) -> None:
    runner = threading.Thread(target=lambda: sh("agentctl", "run", "demo-web", check=False))
    runner.start()
    time.sleep(delay)
    kill9_and_restart()
    runner.join(timeout=60)
    def settled() -> tuple[dict[str, dict[str, Any]]] | None:
        p = ps()
        return (p,) if all(r["state"] == "running" for r in p.values()) else None

    (cells,) = wait_for(settled, "cells to settle (running or gone)")
    assert set(cells) <= {"demo-web"}
    if "demo-web" in cells:  # the plan had committed: adopted; else undone and forgotten
        assert "<" in http_get(cells["demo-web"]["address"])
        ctl("stop", "demo-web")
    assert leftovers() == clean
