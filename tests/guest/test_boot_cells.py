"""The boot-time cells of the shipped overlay: /etc/init.d/S60agent-cells starts the cells
listed in /etc/default/agent-cells (demo-web and demo-client), as `./dev box` shows.

The box's test mode boots without them (rcS skips S60agent-cells), so this test starts
them the way init does and stops them again.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

SCRIPT = "/etc/init.d/S60agent-cells"


def ctl(*args: str) -> object:
    r = subprocess.run(["agentctl", "--json", *args], capture_output=True, text=True,
                       cwd="/", timeout=120)
    assert r.returncode == 0, f"agentctl {' '.join(args)}: {r.stderr}"
    return json.loads(r.stdout)


def configured_cells() -> list[str]:
    for line in Path("/etc/default/agent-cells").read_text().splitlines():
        if line.startswith("CELLS="):
            return line.split("=", 1)[1].strip('"').split()
    raise AssertionError("no CELLS= in /etc/default/agent-cells")


def test_boot_script_starts_the_configured_cells() -> None:
    cells = configured_cells()
    assert cells == ["demo-web", "demo-client"]
    for _ in range(100):
        if subprocess.run(["agentctl", "ping"], capture_output=True, cwd="/").returncode == 0:
            break
        time.sleep(0.2)
    r = subprocess.run(["sh", SCRIPT, "start"], capture_output=True, text=True, cwd="/",
                       timeout=300)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.strip() == "Starting cells: demo-web demo-client"
        rows = {row["name"]: row for row in ctl("ps")}  # type: ignore[union-attr]
        for name in cells:
            assert rows[name]["state"] == "running", rows
        assert rows["demo-web"]["vlan"] == 100
        # demo-client fetches demo-web's page by the name its /etc/hosts gives it, through
        # the host's forwarding table that its manifest's peers opened (port 8080 only).
        page = ""
        for _ in range(120):
            logs = ctl("logs", "demo-client")
            page = json.dumps(logs)
            if "hello from demo-web" in page:
                break
            time.sleep(0.5)
        assert "hello from demo-web" in page, page
        # a second start (init re-run) leaves the running cells alone and says so
        again = subprocess.run(["sh", SCRIPT, "start"], capture_output=True, text=True,
                               cwd="/", timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.strip() == "Starting cells: demo-web(running) demo-client(running)"
        rows2 = {row["name"]: row for row in ctl("ps")}  # type: ignore[union-attr]
        assert rows2["demo-web"]["pid"] == rows["demo-web"]["pid"]
    finally:
        for name in cells:
            subprocess.run(["agentctl", "stop", name], capture_output=True, cwd="/",
                           timeout=120)
    assert ctl("ps") == []
