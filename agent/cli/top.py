"""``agentctl top``, ``pin`` and ``unpin`` (registered by agent.cli).

``top`` works on a plain serial terminal, without curses: when stdout is a tty each
refresh clears the screen with one ANSI sequence and redraws; otherwise (a pipe, a log)
each refresh is a new block after a blank line.  Every line fits 80 columns and is
escaped (:func:`agent.core.tty.escape`): the one control sequence written is the clear.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any, TextIO

from agent.cli.client import Client
from agent.core.tty import escape, json_text

__all__ = ["CLEAR", "add_parsers", "cmd_pin", "cmd_top", "cmd_unpin", "format_top"]

CLEAR = "\x1b[H\x1b[2J"
WIDTH = 80


def _mib(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    if n >= 10 << 30:
        return f"{n >> 30}G"
    return f"{n / (1 << 20):.0f}M" if n >= 100 << 20 else f"{n / (1 << 20):.1f}M"


def _pct(v: Any) -> str:
    return "-" if not isinstance(v, int | float) else f"{v:.1f}"


def format_top(result: dict[str, Any], now: str = "") -> list[str]:
    """The screen: one header line, a column line, one line per cell (80 columns)."""
    free = result.get("budget_free") or {}
    box = result.get("box_memory_pressure")
    head = (f"agentd top {now}  cells {len(result.get('cells', []))}  free cpu "
            f"{free.get('cpu', '-')}m mem {_mib(free.get('memory'))}  box mem psi "
            f"{_pct(box)}%")
    lines = [escape(head)[:WIDTH],
             f"{'NAME':<14} {'STATE':<8} {'CPU%':>5} {'CPU.MAX':>7} {'MEM':>6} {'HIGH':>6} "
             f"{'MAX':>6} {'PSI.C':>5} {'PSI.M':>5} {'PIDS':>4} {'F':<3}"]
    for r in result.get("cells", []):
        cpu_max = r.get("cpu_max")
        flags = ("P" if r.get("pinned") else "") + {"throttled": "T", "frozen": "Z",
                                                     "stopped": "S"}.get(r.get("level", ""), "")
        if not r.get("tuned"):
            flags += "-"
        line = (f"{str(r.get('name', '?'))[:14]:<14} {str(r.get('state', '?'))[:8]:<8} "
                f"{_pct(r.get('cpu_pct')):>5} "
                f"{(str(cpu_max) + 'm') if isinstance(cpu_max, int) else '-':>7} "
                f"{_mib(r.get('memory_current')):>6} {_mib(r.get('memory_high')):>6} "
                f"{_mib(r.get('memory_max')):>6} {_pct(r.get('cpu_pressure')):>5} "
                f"{_pct(r.get('memory_pressure')):>5} "
                f"{r.get('pids') if r.get('pids') is not None else '-':>4} {flags:<3}")
        lines.append(escape(line)[:WIDTH])
    return lines


def cmd_top(client: Client, ns: argparse.Namespace, out: TextIO,
            sleep: Callable[[float], None] = time.sleep) -> int:
    tty = out.isatty()
    first = True
    while True:
        result = client.call("top")
        if ns.json:
            print(json_text(result), file=out, flush=True)
        else:
            screen = format_top(result, time.strftime("%H:%M:%S"))
            prefix = CLEAR if tty else ("" if first else "\n")
            out.write(prefix + "\n".join(screen) + "\n")
            out.flush()
        first = False
        if ns.once:
            return 0
        sleep(ns.delay)


def cmd_pin(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    args: dict[str, Any] = {"name": ns.name}
    if ns.cpu is not None:
        args["cpu"] = ns.cpu
    if ns.memory is not None:
        args["memory"] = ns.memory
    r = client.call("pin", **args)
    print(json_text(r) if ns.json else
          escape(f"{r['name']}: pinned at cpu.max {r['cpu_max']}m, memory.high "
                 f"{_mib(r['memory_high'])}, memory.max {_mib(r['memory_max'])}"), file=out)
    return 0


def cmd_unpin(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    r = client.call("unpin", name=ns.name)
    print(json_text(r) if ns.json else
          escape(f"{r['name']}: unpinned, the tuner resizes it again"), file=out)
    return 0


def _positive(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return v


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    sp = sub.add_parser("top", parents=[common],
                        help="per-cell CPU, memory, limits, pressure, pids (refreshing)")
    sp.add_argument("--once", action="store_true", help="print one screen and exit")
    sp.add_argument("-d", "--delay", type=_positive, default=2.0, metavar="SECONDS",
                    help="refresh interval (default 2)")
    sp.set_defaults(func=cmd_top)
    sp = sub.add_parser("pin", parents=[common],
                        help="fix a cell's size: the tuner stops resizing it")
    sp.add_argument("name")
    sp.add_argument("--cpu", help="cpu.max, e.g. 250m or 0.5 (default: keep)")
    sp.add_argument("--memory", help="memory.max, e.g. 64M (default: keep)")
    sp.set_defaults(func=cmd_pin)
    sp = sub.add_parser("unpin", parents=[common], help="let the tuner resize a cell again")
    sp.add_argument("name")
    sp.set_defaults(func=cmd_unpin)
