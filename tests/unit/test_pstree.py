"""``ps --tree``: the daemon's half (agent.daemon.cellapi.process_tree, over this test's own
processes standing in for a cell's) and the CLI's view (agent.cli.pstree)."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.cli.pstree import format_tree
from agent.core.errors import KernelError, NotFoundError
from agent.daemon.cellapi import process_tree


@dataclass
class Cgroup:
    members: dict[str, list[int]] = field(default_factory=dict)

    def procs(self, cell: str) -> list[int]:
        if cell not in self.members:
            raise KernelError("open", f"cgroup of {cell}", 2)
        return self.members[cell]

    def pid_to_cell(self, pid: int, proc_root: Path = Path("/proc")) -> str | None:
        return next((c for c, m in self.members.items() if pid in m), None)


@dataclass
class Entry:
    class state:
        value = "running"


@dataclass
class Manager:
    cgroup: Cgroup
    cells: dict[str, Entry]

    def entry(self, name: str) -> Entry:
        if name not in self.cells:
            raise NotFoundError("E_NOT_FOUND", f"no cell {name!r}")
        return self.cells[name]


def test_the_tree_of_a_set_of_live_processes() -> None:
    p = subprocess.Popen(["/bin/sh", "-c", "sleep 30 & exec sleep 31"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kids = [int(x) for x in Path(f"/proc/{p.pid}/task/{p.pid}/children")
                    .read_text().split()]
            if kids and Path(f"/proc/{p.pid}/comm").read_text().strip() == "sleep" and all(
                    Path(f"/proc/{k}/comm").read_text().strip() == "sleep" for k in kids):
                break
            time.sleep(0.02)
        mgr = Manager(Cgroup({"web": [kids[0], p.pid, 999_999_999]}), {"web": Entry()})
        d = process_tree(mgr, "web")  # type: ignore[arg-type]
        assert d["name"] == "web" and d["state"] == "running" and not d["truncated"]
        rows = d["procs"]
        assert [(r["hpid"], r["depth"]) for r in rows] == [(p.pid, 0), (kids[0], 1)]
        assert rows[1]["ppid"] == rows[0]["pid"] == p.pid and rows[0]["ppid"] == 0
        assert rows[0]["exe"].endswith("sleep") and rows[0]["euid"] == os.geteuid()
        lines = format_tree(d)
        assert "2 processes" in lines[0] and lines[3].split()[1] == str(kids[0])
        assert "└─" in lines[3] and all(len(x) <= 80 for x in lines)
        assert process_tree(mgr, "web", limit=1)["truncated"]  # type: ignore[arg-type]
    finally:
        subprocess.run(["pkill", "-P", str(p.pid)], check=False)
        p.kill()
        p.wait()


def test_a_cell_without_a_cgroup_has_no_processes_and_an_unknown_one_is_not_found() -> None:
    mgr = Manager(Cgroup(), {"web": Entry()})
    d = process_tree(mgr, "web")  # type: ignore[arg-type]
    assert d["procs"] == [] and format_tree(d)[-1] == "(no processes)"
    with pytest.raises(NotFoundError):
        process_tree(mgr, "db")  # type: ignore[arg-type]


def test_the_view_names_a_renamed_process_and_unknown_values() -> None:
    d = {"name": "web", "state": "running", "truncated": True, "procs": [
        {"pid": 1, "hpid": 500, "euid": 0, "comm": "worker", "exe": "/bin/httpd", "depth": 0},
        {"pid": None, "hpid": 501, "euid": None, "comm": "", "exe": "", "depth": 1}]}
    lines = format_tree(d)
    assert "(truncated)" in lines[0]
    assert lines[2].split() == ["1", "500", "0", "worker", "(/bin/httpd)"]
    assert lines[3].split() == ["-", "501", "-", "└─?"]


def test_what_a_cell_names_cannot_drive_the_terminal() -> None:
    d = {"name": "web", "state": "running", "procs": [
        {"pid": 1, "hpid": 500, "euid": 0, "comm": "\x1b]0;pwned\x07", "exe": "/bin/\u202ex",
         "depth": 0}]}
    line = format_tree(d)[2]
    assert "\x1b" not in line and "\x07" not in line and "\u202e" not in line
    assert "\\x1b" in line
