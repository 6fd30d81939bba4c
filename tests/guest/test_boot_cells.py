"""The boot-time cells of the shipped overlay: /etc/init.d/S60agent-cells starts the cells
listed in /etc/default/agent-cells (demo-web and demo-client), as `./dev box` shows.

The box's test mode boots without them (rcS skips S60agent-cells), so this test starts
them the way init does and stops them again.
"""

from __future__ import annotations

from pathlib import Path

from cellkit import ctl, logs, sh, up, wait_for

SCRIPT = "/etc/init.d/S60agent-cells"


def configured_cells() -> list[str]:
    for line in Path("/etc/default/agent-cells").read_text().splitlines():
        if line.startswith("CELLS="):
            return line.split("=", 1)[1].strip('"').split()
    raise AssertionError("no CELLS= in /etc/default/agent-cells")


def test_boot_script_starts_the_configured_cells() -> None:
    cells = configured_cells()
    assert cells == ["demo-web", "demo-client"]
    wait_for(up, "agentd started at boot", timeout=60)
    r = sh("sh", SCRIPT, "start", check=False, timeout=300)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.strip() == "Starting cells: demo-web demo-client"
        rows = {row["name"]: row for row in ctl("ps", timeout=120)}
        for name in cells:
            assert rows[name]["state"] == "running", rows
        assert rows["demo-web"]["vlan"] == 100
        # demo-client fetches demo-web's page by the name its /etc/hosts gives it, through
        # the host's forwarding table that its manifest's peers opened (port 8080 only).
        wait_for(lambda: any("hello from demo-web" in x for x in logs("demo-client")),
                 "demo-client to print demo-web's page", timeout=120, every=0.5)
        # a second start (init re-run) leaves the running cells alone and says so
        again = sh("sh", SCRIPT, "start", check=False, timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.strip() == "Starting cells: demo-web(running) demo-client(running)"
        rows2 = {row["name"]: row for row in ctl("ps", timeout=120)}
        assert rows2["demo-web"]["pid"] == rows["demo-web"]["pid"]
    finally:
        for name in cells:
            sh("agentctl", "stop", name, check=False, timeout=120)
    assert ctl("ps", timeout=120) == []
