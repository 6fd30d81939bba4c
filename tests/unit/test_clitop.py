"""agentctl top/pin/unpin formatting (no daemon): 80 columns, tty vs pipe output."""

from __future__ import annotations

import argparse
import io
from typing import Any

from agent.cli.main import _parser
from agent.cli.top import CLEAR, cmd_top, format_top

ROW = {"name": "a-very-long-cell-name-indeed", "state": "running", "cpu_pct": 123.4,
       "cpu_max": 10000, "memory_current": 123 << 20, "memory_high": 7 << 30,
       "memory_max": 8 << 30, "cpu_pressure": 99.99, "memory_pressure": 0.0, "pids": 4096,
       "tuned": True, "pinned": True, "level": "throttled"}
RESULT = {"cells": [ROW, {"name": "b", "state": "creating", "tuned": False}],
          "budget_free": {"cpu": 1800, "memory": 512 << 20}, "box_memory_pressure": None}


def test_every_line_fits_80_columns_and_shows_the_flags() -> None:
    lines = format_top(RESULT, "12:00:00")
    assert len(lines) == 4 and all(len(x) <= 80 for x in lines)
    assert "PT" in lines[2] and lines[3].rstrip().endswith("-")
    assert "8192M" in lines[2] or "8G" in lines[2]


class Fake:
    def __init__(self) -> None:
        self.calls = 0

    def call(self, op: str, **args: Any) -> Any:
        self.calls += 1
        return RESULT


class Out(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def run_top(tty: bool, n: int) -> str:
    ns = argparse.Namespace(json=False, once=False, delay=1.0)
    out, fake, left = Out(tty), Fake(), [n]

    def sleep(_: float) -> None:
        left[0] -= 1
        if not left[0]:
            raise KeyboardInterrupt

    try:
        cmd_top(fake, ns, out, sleep)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        pass
    assert fake.calls == n
    return out.getvalue()


def test_tty_redraws_with_clear_screen_and_pipe_prints_blocks() -> None:
    tty = run_top(True, 3)
    assert tty.count(CLEAR) == 3
    pipe = run_top(False, 3)
    assert CLEAR not in pipe and "\x1b" not in pipe
    assert pipe.count("agentd top") == 3 and pipe.count("\n\n") == 2


def test_parser_knows_top_pin_unpin() -> None:
    p = _parser()
    ns = p.parse_args(["top", "--once", "-d", "0.5"])
    assert ns.once and ns.delay == 0.5
    ns = p.parse_args(["pin", "web", "--cpu", "250m", "--memory", "64M"])
    assert (ns.name, ns.cpu, ns.memory) == ("web", "250m", "64M")
    assert p.parse_args(["unpin", "web"]).name == "web"
