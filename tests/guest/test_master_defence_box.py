"""The master re-made by a pattern, in the box (issue 12, item 5), on the installed image:
a pattern tagged ``master`` respawns agentd for real: the same pid re-executed from the
installed image, the ``master/respawn`` event in the event log after the alert that
caused it, a running cell adopted (same pid), the pattern library back.  The control:
another cell's start (the one adopted) matches nothing tagged master.

The integrity watch's scenario (a changed installed file: alerts, and the respawn
refused) is ``test_master_files_changed`` in ``test_correlation_attacks_box.py``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cellkit import (
    agentd_pid,
    call,
    clean,
    ctl,
    ps,
    restart_agentd,
    start,
    wait_for,
    write_manifest,
)
from corrkit import DEFAULT_PAT, INCOMING, STORE, drop, make_bundle

__all__ = ["clean"]

SHIPPED = "/etc/agent/patterns/default.bundle"
TRIGGER = """
pattern md-master-test
  about a test pattern of tests/guest/test_master_defence_box.py
  severity alert
  tag master
  step up: lifecycle/running cell == "md-trigger"
end
"""


def logged(kind: str, channel: str = "master") -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = call("events.log", n=200, channel=channel, kind=kind)
    return got


@pytest.fixture
def shipped() -> Iterator[int]:
    """agentd with only the shipped bundle, before and after (as test_correlation_box)."""
    def updated() -> bool:
        return any(d.exists() and any(d.iterdir()) for d in (STORE, INCOMING)) or \
            call("patterns")["origin"] != SHIPPED

    def reset() -> None:
        for d in (STORE, INCOMING):
            for p in d.iterdir() if d.exists() else ():
                p.unlink()
        restart_agentd()

    if updated():
        reset()
    version = int(call("patterns")["version"])
    yield version
    # A rollback to the shipped bundle after the test is as good as a restart.
    if any(d.exists() and any(d.iterdir()) for d in (STORE, INCOMING)) or \
            call("patterns")["version"] != version:
        reset()


def test_a_master_pattern_respawns_agentd_and_it_adopts_its_cells(
        clean: dict[str, Any], shipped: int) -> None:
    version = shipped + 1
    with tempfile.TemporaryDirectory() as tmp:
        drop(make_bundle(Path(tmp), DEFAULT_PAT.read_text() + TRIGGER, version), "md")
    wait_for(lambda: call("patterns")["version"] == version, "the test bundle")
    pid, respawns = agentd_pid(), len(logged("respawn"))
    # The control: another cell running (this one, adopted later) matches nothing
    # tagged master.
    kept = start("md-keep", ["sleep", "3600"])
    time.sleep(1)
    assert len(logged("respawn")) == respawns and agentd_pid() == pid
    # The attack (by the test pattern's definition): md-trigger starts running.
    write_manifest("md-trigger", ["sleep", "3600"])
    ctl("run", "md-trigger")

    def respawned() -> list[dict[str, Any]]:
        try:
            return [e for e in logged("respawn")
                    if e["attrs"].get("pattern") == "md-master-test"]
        except Exception:  # the control socket while the new master starts
            return []

    (resp,) = wait_for(respawned, "master/respawn in the event log", timeout=120)
    assert resp["attrs"]["reason"] == "pattern" and "control" in resp["attrs"]["kept"]
    alert = [e for e in call("events.log", n=200, channel="correlation", kind="alert")
             if e["attrs"]["pattern"] == "md-master-test"]
    assert alert and alert[0]["seq"] < resp["seq"]  # the alert was out first
    wait_for(lambda: isinstance(call("status").get("budget"), dict), "the new master",
             timeout=120)
    assert agentd_pid() == pid  # re-executed in place
    rows = ps()
    assert rows["md-keep"]["state"] == "running" and rows["md-keep"]["pid"] == kept["pid"]
    wait_for(lambda: call("patterns")["version"] == version, "the library back")
    ctl("patterns", "rollback")  # the shipped library again, without a restart
