"""``agentctl checkconfig`` on the box's real kernel (Debian 6.1 arm64).

The box's kernel configuration is the one of the running kernel when the image
carries it (``/proc/config.gz``, ``/boot/config-<release>``); otherwise the
agent's own fragment (everything the agent uses, as a complete config would
have it) stands in for it.  The reduced configuration drops PSI, bridge VLAN
filtering and the pids controller from it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.core.kconfig import FEATURES, render_fragment
from agent.kernel.probes import load_config

RELEASE = os.uname().release
DROP = ("PSI", "BRIDGE_VLAN_FILTERING", "CGROUP_PIDS")
DROPPED = {"psi", "bridge_vlan", "pids"}  # the features that need them


def checkconfig(*args: str) -> tuple[int, str]:
    # cwd "/": never import the work tree (/mnt/src) instead of the installed agent.
    r = subprocess.run(["agentctl", "checkconfig", *args], capture_output=True, text=True,
                       cwd="/", timeout=60)
    assert r.returncode in (0, 1), f"exit {r.returncode}: {r.stdout}{r.stderr}"
    return r.returncode, r.stdout


def report(*args: str) -> tuple[int, dict[str, Any]]:
    rc, out = checkconfig("--json", *args)
    return rc, json.loads(out)


def statuses(rep: dict[str, Any]) -> dict[str, str]:
    return {f["name"]: f["status"] for f in rep["features"]}


def box_config() -> str:
    found = load_config(Path("/"), RELEASE)
    if found is None:
        return render_fragment()
    return "".join(f"CONFIG_{k}={v}\n" if v != "n" else f"# CONFIG_{k} is not set\n"
                   for k, v in found[1].items())


def test_live_kernel_has_every_required_feature() -> None:
    rc, rep = report()
    assert rc == 0 and rep["ok"] is True and rep["release"] == RELEASE
    st = statuses(rep)
    required = {f.name for f in FEATURES if f.required}
    probed = {f.name for f in FEATURES if f.required and f.probe}
    assert {n: st[n] for n in probed if st[n] != "present"} == {}
    if rep["config"] is not None:
        assert {n: st[n] for n in required if st[n] != "present"} == {}
    else:  # without a config, what no probe can see is unknown, never missing
        assert {st[n] for n in required - probed} <= {"unknown"}
    # the box is cgroup v2 with PSI on: nothing the agent prefers is degraded there
    assert st["cgroup2"] == "present" and st["psi"] == "present" and st["pids"] == "present"


def test_text_report_fits_the_console() -> None:
    rc, out = checkconfig()
    lines = out.splitlines()
    assert rc == 0 and lines[0] == f"Kernel {RELEASE}" and lines[-1] == "Result: ok"
    assert all(len(x) <= 80 for x in lines), [x for x in lines if len(x) > 80]


def test_running_kernel_config_is_found() -> None:
    found = load_config(Path("/"), RELEASE)
    if found is None:
        pytest.fail("the image has no /boot/config-* nor /proc/config.gz "
                    "(qemu/image.py removes /boot from the root disk)")
    rc, rep = report()
    assert rc == 0 and rep["config"] == found[0]


def test_box_config_with_live_probes_is_all_present(tmp_path: Path) -> None:
    full = tmp_path / "config"
    full.write_text(box_config())
    rc, rep = report("--config", str(full), "--root", "/")
    assert rc == 0
    st = statuses(rep)
    assert {f.name: st[f.name] for f in FEATURES if f.required and st[f.name] != "present"} == {}


def test_reduced_config_reports_the_missing_items(tmp_path: Path) -> None:
    full, reduced = tmp_path / "config", tmp_path / "config-reduced"
    text = box_config()
    full.write_text(text)
    reduced.write_text("".join(line + "\n" for line in text.splitlines()
                               if not any(line.startswith(f"CONFIG_{s}=") for s in DROP)))
    rc_full, rep_full = report("--config", str(full))
    rc, rep = report("--config", str(reduced))
    assert rc_full == 0 and rc == 1 and rep["ok"] is False
    before, after = statuses(rep_full), statuses(rep)
    changed = {n for n in after if after[n] != before[n]}
    assert changed == DROPPED
    assert {after[n] for n in DROPPED} == {"missing"}
    details = {f["name"]: f for f in rep["features"]}
    assert "CONFIG_PSI not set" in details["psi"]["detail"]
    assert details["bridge_vlan"]["consequence"]
    # the text form names them and says why the exit status is 1
    rc, out = checkconfig("--config", str(reduced))
    assert rc == 1 and out.splitlines()[-1] == "Result: missing bridge_vlan"
    assert "CONFIG_BRIDGE_VLAN_FILTERING not set" in out


def test_reduced_config_with_live_probes(tmp_path: Path) -> None:
    """The probes speak for the running kernel: PSI and pids work, so they stay present;
    bridge VLAN filtering has no probe, so the config's word stands."""
    reduced = tmp_path / "config-reduced"
    reduced.write_text("".join(line + "\n" for line in box_config().splitlines()
                               if not any(line.startswith(f"CONFIG_{s}=") for s in DROP)))
    rc, rep = report("--config", str(reduced), "--root", "/")
    st = statuses(rep)
    assert rc == 1 and st["bridge_vlan"] == "missing"
    assert st["psi"] == "present" and st["pids"] == "present"
