"""bench/cellbench.py and cellrefs.py: the reference rows stay references, its table adds up.

The figures themselves come from the box (``bench/run cells``); here: the crun row's
network is made by iproute2's commands only (no agent code, so the reference cannot move
when the agent gets faster), and the report's floor row, ratio columns, flatness, burst
and RSS lines are computed from the rows as documented.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import cellbench  # bench/cellbench.py  # noqa: E402
import cellrefs  # bench/cellrefs.py  # noqa: E402


def test_crun_row_uses_no_agent_code() -> None:
    src = inspect.getsource(cellrefs.CrunRuntime)
    tree = ast.parse(src)
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports == []
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"NetRuntime", "AgentRuntime", "HostNet"}
    assert "agent." not in src


@pytest.mark.parametrize("name", ["CRUN_NET_UP", "CRUN_NET_DOWN", "CRUN_GW_UP",
                                  "CRUN_GW_DOWN"])
def test_crun_scripts_are_iproute2_commands(name: str) -> None:
    text: str = getattr(cellrefs, name)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    assert lines[0].startswith("set -")
    for ln in lines[1:]:
        assert re.match(r'("\$IP"|"\$BRIDGE_CMD") ', ln) or ln.startswith('"$IP"'), ln
    assert "python" not in text and "agent" not in text


def test_crun_net_up_wires_the_vlan_port() -> None:
    up = cellrefs.CRUN_NET_UP
    for step in ('netns add "$NS"', 'type veth peer name "$PEER"', 'master "$BR" up',
                 'vid "$VID" pvid untagged', 'vlan del dev "$HOST" vid 1',
                 'name eth0', 'link set lo up', 'addr add "$ADDR"',
                 'route add default via "$GW"'):
        assert step in up, step


def test_box_image_has_iproute2() -> None:
    lines = (ROOT / "qemu/packages.txt").read_text().splitlines()
    assert "iproute2" in [ln.strip() for ln in lines]


def _row(name: str, starts: list[float], stops: list[float]) -> cellbench.Runtime:
    rt = cellbench.Runtime(name, lambda i, m: None, lambda i: None)
    rt.starts, rt.stops = starts, stops
    return rt


def test_report_floor_ratios_flatness_burst_rss() -> None:
    rows = [_row("agent", [100.0, 200.0, 300.0], [50.0, 60.0, 70.0]),
            _row("agent@32", [120.0, 240.0, 360.0], [55.0, 66.0, 77.0]),
            _row("crun", [400.0, 400.0, 400.0], [120.0, 120.0, 120.0]),
            _row("bwrap", [8.0, 8.0, 10.0], [1.0, 1.0, 1.0]),
            _row("net", [30.0, 40.0, 50.0], [20.0, 20.0, 20.0])]
    broken = cellbench.Runtime("other", lambda i, m: None, lambda i: None)
    broken.error = "RuntimeError: boom"
    extra: dict[str, object] = {
        "burst_16_at_once_ms": 1500.0, "burst_16_sequential_ms": 3000.0,
        "agentd_rss_kib_32": 48000, "agentd_rss_kib_1": 40000,
        "agentd_rss_kib_idle": 39000, "agent_helpers_per_cell": 0.0}
    results: dict[str, object] = {"n": 3}
    text = cellbench.report([*rows, broken], extra, results)
    table = [ln for ln in text.splitlines()[2:]
             if ln.split()[1].endswith("ms") or ln.split()[1] == "error:"]
    lines = {ln.split()[0]: ln for ln in table}
    assert list(lines) == ["agent", "agent@32", "crun", "bwrap", "net", "other", "floor"]
    # agent: median 200 = x0.50 of crun's 400; stop 60 = x0.50 of 120
    assert lines["agent"].split()[-2:] == ["x0.50", "x0.50"]
    assert lines["crun"].split()[-2:] == ["x1.00", "x1.00"]
    # floor = bwrap + net, medians and p90s added: 8 + 40, 10 + 50
    floor = lines["floor"].split()
    assert floor[1:3] == ["48.0ms", "60.0ms"]
    assert results["floor"] == {"start_median": 48.0, "start_p90": 60.0,
                                "stop_median": 21.0, "stop_p90": 21.0}
    assert lines["other"] == "other     error: RuntimeError: boom"
    assert "agent@32 / agent (flat in the number of cells): start x1.20, stop x1.10" in text
    assert "agent / floor: start x4.17" in text
    assert "burst at once / sequential: x0.50" in text
    rss = [ln for ln in text.splitlines() if ln.startswith("agentd_rss")]
    assert rss == ["agentd_rss_kib_idle: 39000 KiB", "agentd_rss_kib_1: 40000 KiB",
                   "agentd_rss_kib_32: 48000 KiB"]
    assert results["burst_16_at_once_ms"] == 1500.0


def test_report_without_crun_or_floor() -> None:
    text = cellbench.report([_row("agent", [100.0], [50.0])], {}, {"n": 1})
    agent = next(ln for ln in text.splitlines() if ln.startswith("agent "))
    assert agent.split()[-2:] == ["-", "-"]
    assert not any(ln.startswith("floor") for ln in text.splitlines())
    assert "agent / floor" not in text


def test_quantiles() -> None:
    assert cellbench.quantiles([float(x) for x in range(1, 12)]) == (6.0, 10.0)
