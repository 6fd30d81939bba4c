"""``agentctl ps --tree NAME``: a cell's process tree, one line per process.

The rows come from agentd's ``ps`` op with ``tree`` (agent.daemon.cellapi.process_tree),
depth first; pids and uids as the cell sees them, ``HPID`` the host's.  Names and paths
come from the cell (a process sets its own ``comm``): every line is escaped
(agent.core.tty) so none can drive the terminal.
"""

from __future__ import annotations

from typing import Any

from agent.core.tty import escape

__all__ = ["format_tree"]

WIDTH = 80


def format_tree(d: dict[str, Any]) -> list[str]:
    procs = d.get("procs") or []
    lines = [f"cell {d.get('name')}  state {d.get('state')}  {len(procs)} processes"
             + ("  (truncated)" if d.get("truncated") else ""),
             f"{'PID':>7} {'HPID':>7} {'UID':>5}  COMMAND"]
    for r in procs:
        pid = r.get("pid")
        uid = r.get("euid")
        depth = int(r.get("depth") or 0)
        exe = str(r.get("exe") or "")
        comm = str(r.get("comm") or "")
        base = exe.rsplit("/", 1)[-1]
        # the executable, and the name when the process renamed itself (comm: 15 chars)
        what = exe if comm and base.startswith(comm) else \
            f"{comm or '?'} ({exe})" if exe else comm or "?"
        line = (f"{'-' if pid is None else pid:>7} {r.get('hpid', '-'):>7} "
                f"{'-' if uid is None else uid:>5}  {'  ' * depth}{'└─' if depth else ''}{what}")
        lines.append(line)
    if not procs:
        lines.append("(no processes)")
    return [escape(x)[:WIDTH] for x in lines]
