"""Channel 4 in the box: the correlation service of the live agentd, on real events.

* ``escapes-across-cells`` (a default pattern) on the traps the spawner publishes today:
  refused ``mount`` calls from one cell, then a second are no campaign (the control);
  from a third cell, the alert, with its chain, persisted in the event log.
* A benign workload across several cells raises no alert, while the engine sees its
  events.
* A bundle update while events flow: the partial match of an unchanged pattern
  survives an install (agentctl, in chunks), refusals of bad bundles dropped in the
  update directory (a bad signature, an older version, a newer engine), a good update
  through the directory, a rollback and a restart (the store brings the bundle back,
  the rollback holds).

The scenarios of the default patterns whose events channels 1-3 will publish are in
``test_correlation_attacks_box.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cellkit import (
    SERVICES,
    call,
    clean,
    ctl,
    http_get,
    restart_agentd,
    run_until_gone,
    sh,
    start,
    wait_for,
    write_manifest,
)
from corrkit import (
    DEFAULT_PAT,
    INCOMING,
    STORE,
    bundle_events,
    drop,
    expect_alert,
    last_seq,
    make_bundle,
    mount_in,
    no_alert,
    pattern_row,
    persisted_alerts,
    wait_version,
)

__all__ = ["clean"]

SHIPPED = "/etc/agent/patterns/default.bundle"
ADDED = """
pattern corr-test-running
  about a test pattern of tests/guest/test_correlation_box.py
  severity notice
  step up: lifecycle/running cell == "corr-added"
end
"""


def _reset() -> None:
    for d in (STORE, INCOMING):
        if d.exists():
            for p in d.iterdir():
                p.unlink()
    restart_agentd()


def _updated() -> bool:
    return any(d.exists() and any(d.iterdir()) for d in (STORE, INCOMING)) or \
        call("patterns")["origin"] != SHIPPED


@pytest.fixture
def shipped() -> Iterator[int]:
    """agentd with only the shipped bundle (restarted if something else was stored,
    dropped or loaded); its version.  Restored after the test the same way."""
    if _updated():
        _reset()
    yield int(call("patterns")["version"])
    if _updated():
        _reset()


def test_escape_calls_from_three_cells_raise_one_alert(clean: dict[str, Any],
                                                       shipped: int) -> None:
    if pattern_row("escapes-across-cells")["partials"]:
        restart_agentd()  # another test's escapes within its window: begin afresh
    since, before = last_seq(), call("status")["correlation"]
    mount_in("corr-esc-a")
    mount_in("corr-esc-a")  # the same cell again: still one cell
    mount_in("corr-esc-b")
    traps = [e for e in call("events", n=200, channel="syscall", kind="trap")
             if e["seq"] > since and e["attrs"].get("syscall") == "mount"]
    assert {e["cell"] for e in traps} == {"corr-esc-a", "corr-esc-b"}  # the events exist
    time.sleep(1)
    no_alert(since)  # two cells: no campaign (the control)
    assert pattern_row("escapes-across-cells")["partials"] == 1
    mount_in("corr-esc-c")
    alert = expect_alert("escapes-across-cells", since)
    a = alert["attrs"]
    assert alert["severity"] == "alert" and a["response"] == "freeze" and a["tags"] == ["escape"]
    (link,) = a["chain"]  # one counting step: the event that completed the count
    assert (link["channel"], link["kind"], link["cell"]) == ("syscall", "trap", "corr-esc-c")
    assert link["keys"]["syscall"] == "mount" and link["count"] == 3
    assert sorted(link["values"]) == ["corr-esc-a", "corr-esc-b", "corr-esc-c"]
    assert link["first_mono"] < link["mono"] and link["seq"] < alert["seq"]
    assert alert["cell"] == "corr-esc-c"
    # persisted (the event log), and counted
    assert [e["seq"] for e in persisted_alerts(since, "escapes-across-cells")] == [alert["seq"]]
    assert pattern_row("escapes-across-cells")["matches"] == 1
    st = call("status")["correlation"]  # other modules' matches came before
    assert st["matches"] == before["matches"] + 1 and st["dropped"] == before["dropped"]
    listed = call("patterns")["alerts"]
    assert listed[-1]["seq"] == alert["seq"]
    print(f"alert {alert['seq']} {link['values']}; latency in agentd "
          f"{listed[-1]['latency_s'] * 1000:.2f} ms")


def test_a_benign_workload_across_cells_raises_no_alert(clean: dict[str, Any],
                                                        shipped: int) -> None:
    since = last_seq()
    seen = call("status")["correlation"]["events"]
    web = start("corr-web", ["httpd", "-f", "-p", "8080", "-h", "/www"], uid=1000,
                network={"vlan": 160})
    start("corr-idle", ["sh", "-c", "while :; do date > /tmp/now; sleep 1; done"],
          extra='[[writable]]\nkind = "tmpfs"\npath = "/tmp"\nsize = "1M"\n')
    for _ in range(5):
        assert "hello" in http_get(web["address"])
    run_until_gone_manifest("corr-name", ["-c", "hostname corr; echo rc=$?"])  # one denied
    run_until_gone_manifest("corr-work", ["-c", "i=0; while [ $i -lt 200 ]; do "
                                          "i=$((i+1)); done; echo done $i"])
    ctl("stop", "corr-idle")
    time.sleep(2)
    no_alert(since)
    st = call("status")["correlation"]
    assert st["events"] > seen + 10  # the engine saw the workload
    assert st["dropped"] == 0


def run_until_gone_manifest(name: str, args: list[str]) -> list[str]:
    write_manifest(name, args, command="/bin/sh", oneshot=True)
    try:
        return run_until_gone(name)
    finally:
        (SERVICES / f"{name}.toml").unlink(missing_ok=True)


def test_bundle_update_while_events_flow(clean: dict[str, Any], shipped: int,
                                         tmp_path: Path) -> None:
    v0 = shipped
    start("corr-flood", ["-c", "while :; do hostname x 2>/dev/null; usleep 20000; done"],
          command="/bin/sh")
    since = last_seq()
    mount_in("corr-upd-a")
    mount_in("corr-upd-b")
    assert pattern_row("escapes-across-cells")["partials"] == 1
    fed = call("status")["correlation"]["events"]
    # a newer library: the shipped patterns and one more, installed by the operator
    text = DEFAULT_PAT.read_text() + ADDED
    r = ctl("patterns", "install", str(make_bundle(tmp_path, text, v0 + 1, "v1")))
    assert r["version"] == v0 + 1 and r["added"] == ["corr-test-running"]
    assert "escapes-across-cells" in r["kept"] and r["retired"] == 0
    assert r["origin"].startswith("agentctl uid 0")
    # refused, as a fleet's updater would drop them: each with its reason, nothing changes
    bad = make_bundle(tmp_path, text + ADDED.replace("corr-test-running", "corr-x"),
                      v0 + 2, "bad")
    bad.write_bytes(bad.read_bytes()[:-1] + bytes([bad.read_bytes()[-1] ^ 1]))
    mark = last_seq()
    drop(bad, "tampered")
    drop(make_bundle(tmp_path, text, v0, "old"), "old", sig_first=False)
    drop(make_bundle(tmp_path, text, v0 + 2, "new", min_engine=99), "engine")
    refused = wait_for(lambda: len(r := [e for e in bundle_events(mark)
                                         if e["kind"] == "bundle-refused"]) >= 3 and r,
                       "three refusals")
    assert sorted((e["attrs"]["reason"], e["severity"]) for e in refused) == \
        [("E_BUNDLE_ENGINE", "notice"), ("E_BUNDLE_SIGNATURE", "alert"),
         ("E_BUNDLE_VERSION", "alert")]
    assert all(e["attrs"]["loaded"] == v0 + 1 for e in refused)
    wait_for(lambda: not any(INCOMING.iterdir()), "the update dir consumed")
    assert call("patterns")["version"] == v0 + 1
    assert pattern_row("escapes-across-cells")["partials"] == 1  # still there
    # the third cell completes the match begun before the install and the refusals
    mount_in("corr-upd-c")
    alert = expect_alert("escapes-across-cells", since)
    assert sorted(alert["attrs"]["chain"][0]["values"]) == \
        ["corr-upd-a", "corr-upd-b", "corr-upd-c"]
    # the added pattern is live
    run_until_gone_manifest("corr-added", ["-c", "echo up"])
    assert expect_alert("corr-test-running", since)["cell"] == "corr-added"
    st = call("status")["correlation"]
    assert st["events"] > fed and st["version"] == v0 + 1
    print(f"engine fed {st['events'] - fed} events during the update; dropped {st['dropped']}")
    # a good update through the directory, as a fleet delivers it
    mark = last_seq()
    drop(make_bundle(tmp_path, text, v0 + 3, "v3"), "fleet-v3", sig_first=False)
    wait_version(v0 + 3)
    (loaded,) = [e for e in bundle_events(mark) if e["kind"] == "bundle-loaded"]
    assert loaded["attrs"]["origin"] == str(INCOMING / "fleet-v3.bundle")
    assert sorted(p.name for p in STORE.iterdir()) == \
        [f"v{v0 + 1}.bundle", f"v{v0 + 1}.bundle.sig", f"v{v0 + 3}.bundle",
         f"v{v0 + 3}.bundle.sig"]
    # rollback; then a restart brings back what is stored, the rollback included
    r = ctl("patterns", "rollback")
    assert (r["version"], r["origin"]) == (v0 + 1, "rollback")
    assert sorted(p.name for p in STORE.iterdir()) == [f"v{v0 + 1}.bundle",
                                                        f"v{v0 + 1}.bundle.sig"]
    restart_agentd()
    d = call("patterns")
    assert (d["version"], d["previous"]) == (v0 + 1, v0)
    assert d["origin"] == str(STORE / f"v{v0 + 1}.bundle")
    assert sh("agentctl", "patterns").stdout.startswith(f"patterns version {v0 + 1} ")
