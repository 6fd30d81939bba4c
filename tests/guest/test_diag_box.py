"""``agentctl diag`` in the box: the console screen with agentd up and stopped, and the
bundle.  agentd is started by S50agentd at boot; every test leaves it running."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cellkit import ctl, sh, up, wait_for

INIT = "/etc/init.d/S50agentd"
RELEASE = os.uname().release
SLOW = 120  # s: agentctl diag and init scripts on the emulated box


def diag(*args: str) -> subprocess.CompletedProcess[str]:
    """``agentctl diag`` once agentctl dispatches it, ``python3 -m agent.cli.diag`` until then."""
    if re.search(r"^\s+diag\s", sh("agentctl", "--help").stdout, re.M):  # a subcommand
        return sh("agentctl", "diag", *args, timeout=SLOW)
    return sh("python3", "-m", "agent.cli.diag", *args, timeout=SLOW)


def wait_for_ping(want: bool = True) -> None:
    wait_for(lambda: up() == want, f"agentd {'up' if want else 'down'}", timeout=90)


@pytest.fixture
def agentd() -> Iterator[None]:
    if not up():
        sh(INIT, "start", timeout=SLOW)
    wait_for_ping()
    yield
    if not up():
        sh(INIT, "start", timeout=SLOW)
        wait_for_ping()


def check_screen(out: str) -> list[str]:
    lines = out.splitlines()
    assert 0 < len(lines) <= 24, out
    assert all(len(x) <= 80 for x in lines), [x for x in lines if len(x) > 80]
    return lines


def line(lines: list[str], head: str) -> str:
    found = [x for x in lines if x.startswith(head)]
    assert found, f"no `{head}` line in:\n" + "\n".join(lines)
    return found[0]


def test_screen_with_agentd_up(agentd: None) -> None:
    st = ctl("status")
    lines = check_screen(diag().stdout)
    assert re.match(rf"agentd   \S+ pid {st['pid']} up ", line(lines, "agentd "))
    assert line(lines, "kernel ").startswith(f"kernel   {RELEASE} aarch64, cgroup v2, config ")
    assert re.match(r"features \d+ present, \d+ degraded, \d+ missing, 0 unknown",
                    line(lines, "features "))
    assert not any("MISSING required" in x for x in lines)
    ncells = len(ctl("ps"))
    assert line(lines, "cells ").startswith(f"cells    {ncells}")
    assert line(lines, "budget ").startswith("budget   free cpu ")
    assert line(lines, "memory ").endswith("available of " + line(lines, "memory ").split()[-1])
    assert "/ " in line(lines, "disk ") and line(lines, "journal ")
    # agentd's own start is a notice event: the recent list shows it
    assert any(" notice master - started" in x for x in lines)


def test_screen_with_agentd_stopped(agentd: None) -> None:
    sh(INIT, "stop", timeout=SLOW)
    wait_for_ping(want=False)
    try:
        r = diag()
        lines = check_screen(r.stdout)
        assert r.returncode == 0
        assert line(lines, "agentd ").startswith("agentd   DOWN: socket `/run/agent/agentd.sock`")
        assert any("no pid file /var/run/agentd.pid" in x for x in lines)
        assert line(lines, "kernel ").startswith(f"kernel   {RELEASE} aarch64, cgroup v2, config ")
        for head in ("features ", "journal ", "disk ", "memory "):
            line(lines, head)
        assert not any(x.startswith(("cells ", "budget ")) for x in lines)
    finally:
        sh(INIT, "start", timeout=SLOW)
        wait_for_ping()


def test_bundle_has_the_expected_members(agentd: None, tmp_path: Path) -> None:
    ctl("run", "demo-web")
    try:
        out = tmp_path / "bundle.tar.gz"
        r = diag("--bundle", str(out))
        assert r.stdout.startswith(f"{out} (")
        progress = r.stderr.splitlines()
        assert progress and all(re.match(r"diag: \[\d+/\d+\] ", x) for x in progress)
        with tarfile.open(out) as tar:
            names = {m.name.split("/", 1)[1]: m for m in tar.getmembers()}

            def text(name: str) -> str:
                f = tar.extractfile(names[name])
                assert f is not None
                return f.read().decode()

            errors = text("errors.txt")
            status = json.loads(text("daemon/status.json"))
            inspect = json.loads(text("daemon/inspect/demo-web.json"))
            tree = text("cgroup-tree.txt")
            versions = json.loads(text("versions.json"))
            index = text("index.txt")
            check = json.loads(text("kernel/checkconfig.json"))
    finally:
        ctl("stop", "demo-web")
    assert errors == "no errors\n"
    expected = {"errors.txt", "index.txt", "summary.txt", "versions.json", "agentd.log",
                "cgroup-tree.txt", "daemon/status.json", "daemon/ps.json", "daemon/events.json",
                "kernel/checkconfig.json", "kernel/kconfig-summary.txt", "kernel/dmesg-tail.txt",
                "host/mountinfo", "host/proc-meminfo", "host/proc-pressure-memory",
                "files/etc/agent/agentd.toml", "files/etc/agent/policy.toml",
                *(f"files/etc/agent/services/{p.name}"
                  for p in Path("/etc/agent/services").glob("*.toml"))}
    for tool, member in (("ip", "net/ip-link.json"), ("bridge", "net/bridge-vlan-show.json"),
                         ("nft", "net/nft-list-ruleset.json")):
        if shutil.which(tool):
            expected.add(member)
        else:
            assert f"note: {tool} not installed" in index
    assert expected <= set(names), sorted(expected - set(names))
    assert status["pid"] == int(Path("/var/run/agentd.pid").read_text())
    assert inspect["name"] == "demo-web" and inspect["allocation"]["vlan"]
    assert "== /sys/fs/cgroup/agent/demo-web" in tree and "  pids.max: 32" in tree
    assert versions["pyroute2"] != "not installed" and versions["cbor2"] != "not installed"
    assert check["release"] == RELEASE and check["ok"] is True
    assert not any(n.endswith(".key") for n in names)
