"""The default patterns' attacks, run for real from cells (and from the host, for the
attacks on the master) in the box, each checked for its alert and the alert's chain.

Every default pattern runs on the events channels 1-3 and the master's own guards
publish (docs/events.md): ``escapes-across-cells`` in ``test_correlation_box.py``; the
others here, among them ``shared-drop-exec`` (channel 1's file-written, then an exec of
the same content refused in another cell) and ``scan-listen-reach`` (channel 3's scan,
listen and flow).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cellkit import (
    SERVICES,
    agentd_pid,
    call,
    clean,
    logs,
    ps,
    restart_agentd,
    run_until_gone,
    sh,
    start,
    start_probe,
    wait_for,
    write_manifest,
)
from corrkit import alerts, expect_alert, last_seq

__all__ = ["clean"]

# How long a scenario waits for its alert: the attack is over when it starts waiting and
# an alert follows its last event within a turn of agentd's loop; an xfail scenario
# waits this long for nothing, in a tier that has 30 minutes in all.
WAIT = 6.0
DATA_IMAGE = Path("/var/lib/agent/data/corr-drop-a.img")  # the dropper's data dir
POLICY = Path("/etc/agent/policy.toml")
# The drop's path written down, as data-dirs.md asks: corr-drop-b reads corr-drop-a's.
SHARE = '\n[[share]]\ndata = "corr-drop-a"\nreaders = ["corr-drop-b"]\n'


@pytest.fixture(scope="module", autouse=True)
def fresh_engine() -> Iterator[None]:
    """No partial matches of other modules' events; the policy with SHARE (agentd reads
    it at start).  The file is put back afterwards; agentd keeps the share until its
    next start (it names only these two test services)."""
    text = POLICY.read_text()
    POLICY.write_text(text + SHARE)
    try:
        restart_agentd()
        yield
    finally:
        POLICY.write_text(text)


def oneshot(name: str, script: str, **kw: Any) -> list[str]:
    write_manifest(name, ["-c", script], command="/bin/sh", oneshot=True, **kw)
    try:
        return run_until_gone(name)
    finally:
        (SERVICES / f"{name}.toml").unlink(missing_ok=True)


def chain_of(alert: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    return [(x["step"], f"{x['channel']}/{x['kind']}", x["cell"])
            for x in alert["attrs"]["chain"]]


class DataDirUnusable(AssertionError):
    """A cell with a data writable does not start: its bind mount is refused."""


def oneshot_data(name: str, script: str, extra: str) -> list[str]:
    """``oneshot`` for a cell with a data directory (DataDirUnusable when agentd cannot
    mount it: the mapped uid cannot reach <state_dir>/data, 0700 root, today)."""
    write_manifest(name, ["-c", script], command="/bin/sh", oneshot=True, extra=extra)
    try:
        r = sh("agentctl", "run", name, check=False, timeout=120)
        if r.returncode and "mount(bind)" in r.stderr and "EACCES" in r.stderr:
            raise DataDirUnusable(r.stderr.strip())
        assert r.returncode == 0, r.stderr
        wait_for(lambda: name not in ps(), f"{name} to be destroyed", timeout=60)
        return logs(name)
    finally:
        (SERVICES / f"{name}.toml").unlink(missing_ok=True)


def test_shared_drop_exec(clean: dict[str, Any]) -> None:
    own = '[[writable]]\nkind = "data"\npath = "/data"\n'
    since = last_seq()
    try:
        out = oneshot_data("corr-drop-a", "chmod 755 /data && printf '#!/bin/sh\\necho "
                           "ran\\n' > /data/tool && chmod 755 /data/tool && echo dropped",
                           own)
        assert "dropped" in out, out
        out = oneshot_data("corr-drop-b", "cp /data/tool /tmp/tool && /tmp/tool; echo rc=$?",
                           own + 'source = "corr-drop-a"\n[[writable]]\nkind = "tmpfs"\n'
                           'path = "/tmp"\nsize = "1M"\nexec = true\n')
        assert any(x.startswith("rc=") for x in out), out  # the copy was made, then run
        alert = expect_alert("shared-drop-exec", since, timeout=WAIT,
                             steps=("exec/file-written", "exec/exec-denied"))
    finally:
        DATA_IMAGE.unlink(missing_ok=True)
    run = alert["attrs"]["chain"][1]
    assert chain_of(alert) == [("drop", "exec/file-written", "corr-drop-a"),
                               ("run", f"exec/{run['kind']}", "corr-drop-b")]
    assert run["kind"] in ("exec-denied", "exec-unverified")
    assert alert["attrs"]["response"] == "isolate"


def test_scan_listen_reach(clean: dict[str, Any]) -> None:
    # the order the pattern wants: the scan (41 ports, eight at a time: its own table
    # drops them, so each nc waits its second; 20 ports within 10 s make a scan), then
    # the listener (25 s after its cell started), then the scanner reaching it
    start("corr-lis", ["-c", "sleep 25; nc -l -p 4444"], command="/bin/sh", uid=1000,
          network={"vlan": 171})
    target = ps()["corr-lis"]["address"]
    since = last_seq()
    start("corr-scan", ["-c", f"for p in $(seq 20 60); do nc -w 1 {target} $p </dev/null & "
                        "[ $((p % 8)) = 0 ] && wait; done; wait; echo scanned; sleep 30; "
                        f"echo hello | nc -w 3 {target} 4444; echo reached=$?; sleep 3600"],
          command="/bin/sh", uid=1000, resources={"pids_max": 16},
          network={"vlan": 172, "peers": [{"cell": "corr-lis", "ports": [4444]}]})
    wait_for(lambda: any(x.startswith("reached=") for x in logs("corr-scan")),
             "the scanner to reach the listener", timeout=120)
    alert = expect_alert("scan-listen-reach", since, timeout=WAIT,
                         steps=("net/scan", "net/listen", "net/flow"))
    assert chain_of(alert) == [("scan", "net/scan", "corr-scan"),
                               ("open", "net/listen", "corr-lis"),
                               ("reach", "net/flow", "corr-scan")]
    assert alert["attrs"]["chain"][2]["keys"]["dport"] == 4444


# The request (busybox's static wget crashes in the demo image; nc as demo-client does).
ASK = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {address} 8080"
DEPUTY = """
import socket
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8080))
srv.listen(4)
result({"listening": True})
while True:
    conn, _ = srv.accept()
    conn.recv(1024)
    # the request makes this cell try a privileged call its manifest does not grant
    r = call(libc.mount, b"none", b"/tmp", b"tmpfs", 0, None)
    conn.sendall(("HTTP/1.0 200 OK\\r\\n\\r\\nmount " + r + "\\n").encode())
    conn.close()
"""


def test_privileged_by_proxy(clean: dict[str, Any]) -> None:
    row, _ = start_probe("corr-deputy", DEPUTY, network={"vlan": 173})
    since = last_seq()
    out = oneshot("corr-asker", ASK.format(address=row["address"]),
                  network={"vlan": 174, "peers": [{"cell": "corr-deputy", "ports": [8080]}]})
    assert any("mount EPERM" in x for x in out), out  # the deputy was asked, and refused
    alert = expect_alert("privileged-by-proxy", since, timeout=WAIT)
    assert chain_of(alert) == [("ask", "net/flow", "corr-asker"),
                               ("act", "syscall/trap", "corr-deputy")]


CLOCK = DEPUTY.replace(
    'r = call(libc.mount, b"none", b"/tmp", b"tmpfs", 0, None)',
    'import time\n    ts = (ctypes.c_long * 2)(int(time.time()), 0)\n'
    '    r = call(libc.clock_settime, 0, ts)  # granted: the master sets the clock')


def test_host_change_by_proxy(clean: dict[str, Any]) -> None:
    row, _ = start_probe("corr-clock", CLOCK, network={"vlan": 175},
                         extra='[privileges]\nops = ["set_time"]\n')
    since = last_seq()
    out = oneshot("corr-asker2", ASK.format(address=row["address"]),
                  network={"vlan": 176, "peers": [{"cell": "corr-clock", "ports": [8080]}]})
    assert any(x.startswith("mount ") for x in out), out
    alert = expect_alert("host-change-by-proxy", since, timeout=WAIT)
    assert chain_of(alert) == [("ask", "net/flow", "corr-asker2"),
                               ("act", "syscall/trap", "corr-clock"),
                               # the host's change, attributed to the cell it was made for
                               ("change", "host/clock-set", "corr-clock")]


def test_pressure_from_many(clean: dict[str, Any]) -> None:
    since = last_seq()
    names = [f"corr-hot{i}" for i in range(3)]
    for name in names:  # each busy far beyond its CPU limit: CPU pressure, no other harm
        start(name, ["-c", "while :; do :; done"], command="/bin/sh",
              resources={"cpu_max": "100m"})
    alert = expect_alert("pressure-from-many", since, timeout=30)
    (link,) = alert["attrs"]["chain"]
    assert link["count"] == 3 and sorted(link["values"]) == names


MEMFD = """
import os, time
try:
    fd = os.memfd_create("payload")  # a loader's first step: refused (no op memfd)
    made = "ok"
except OSError as e:
    made = errno.errorcode[e.errno]
result({"memfd": made})
time.sleep(3600)
"""


def test_memfd_across_cells(clean: dict[str, Any]) -> None:
    from cellkit import CG, probe

    since = last_seq()
    # the control: one cell alone is not yet a campaign
    assert probe("corr-memfd-a", MEMFD.replace("time.sleep(3600)", "")) == {"memfd": "EPERM"}
    time.sleep(1)
    assert alerts(since, "memfd-across-cells") == []
    # the second cell stays: the pattern's response (freeze) falls on it
    _, r = start_probe("corr-memfd-b", MEMFD)  # it prints before the response comes
    assert r == {"memfd": "EPERM"}
    alert = expect_alert("memfd-across-cells", since, timeout=WAIT)
    assert sorted(alert["attrs"]["chain"][0]["values"]) == ["corr-memfd-a", "corr-memfd-b"]
    assert alert["cell"] == "corr-memfd-b" and alert["attrs"]["response"] == "freeze"
    wait_for(lambda: "frozen 1" in (CG / "corr-memfd-b" / "cgroup.events").read_text(),
             "corr-memfd-b frozen by the response")
    (resp,) = [e for e in call("events", n=200, channel="master", kind="response")
               if e["seq"] > since and e["cell"] == "corr-memfd-b"]
    assert resp["attrs"]["response"] == "freeze" and resp["attrs"]["ok"]


def test_master_files_changed(clean: dict[str, Any]) -> None:
    """An installed file of the agent changed: the integrity watch's agent/integrity
    alert, the pattern's alert, and the respawn it asks for refused (tampered code is
    never run: master/integrity); the file put back, the tree is clean again.  (The
    watch covers the installed package against its seal, not /etc/agent.)"""
    st = wait_for(lambda: (s := call("status")["integrity"])["checks"] >= 1 and s,
                  "the first integrity check")
    assert st["watching"] and st["differences"] == [] and st["problem"] is None, st
    pid, since = agentd_pid(), last_seq()
    target = Path(st["root"]) / "cli" / "seal.py"  # imported by no agentd or agentctl run
    before, stat = target.read_bytes(), target.stat()
    try:
        target.write_bytes(before + b"\nimport os  # tampered\n")
        alert = expect_alert("master-files-changed", since, timeout=30)  # hashing first
        (ev,) = [e for e in call("events", n=500, channel="agent", kind="integrity")
                 if e["seq"] > since]
        assert (ev["attrs"]["path"], ev["attrs"]["reason"]) == (str(target), "changed")
        refused = wait_for(lambda: [e for e in call("events.log", n=200, channel="master",
                                                    kind="integrity") if e["seq"] > since],
                           "the refused respawn")[0]
        assert refused["attrs"]["reason"] == "integrity" and refused["attrs"]["ok"] is False
        assert "cli/seal.py (changed)" in refused["attrs"]["files"]
        assert agentd_pid() == pid  # no exec
    finally:
        target.write_bytes(before)
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # its .pyc stays valid
    assert chain_of(alert) == [("changed", "agent/integrity", None)]
    assert "master" in alert["attrs"]["tags"] and ev["severity"] == "alert"
    wait_for(lambda: call("status")["integrity"]["differences"] == [], "a clean tree again")


def test_master_signalled(clean: dict[str, Any]) -> None:
    t0 = time.time() - 1
    pid = agentd_pid()
    os.kill(pid, signal.SIGUSR1)  # its default would end agentd; not from init
    alert = expect_logged_alert("master-signalled", t0)
    assert alert["attrs"]["chain"][0]["keys"]["sender_pid"] == os.getpid()
    respawned({"master-signalled"}, pid, t0)


def expect_logged_alert(pattern: str, since_ts: float, timeout: float = 30.0
                        ) -> dict[str, Any]:  # fmt: skip
    """The first alert of ``pattern`` after ``since_ts`` in the persistent event log: a
    pattern tagged master re-makes the master within a turn of its loop, and the new
    master's ring (``events``) starts empty (sequence numbers too)."""
    def found() -> dict[str, Any] | None:
        try:
            got = call("events.log", n=200, channel="correlation", kind="alert")
        except Exception:  # the control socket while the new master starts
            return None
        return next((e for e in got if e["attrs"]["pattern"] == pattern
                     and e["ts"] >= since_ts), None)

    return dict(wait_for(found, f"correlation/alert of {pattern} in the event log",
                         timeout=timeout))


def respawned(patterns: set[str], pid: int, since_ts: float) -> None:
    """A pattern tagged master re-makes the master (test_master_defence_box.py has the
    whole respawn): a ``master/respawn`` for one of ``patterns`` (the first to match asks
    for it) in the event log after ``since_ts``, the same pid serving again, so that the
    next tests meet the new master, answering."""
    def logged() -> bool:
        try:
            return any(e["attrs"].get("pattern") in patterns and e["ts"] >= since_ts
                       for e in call("events.log", n=200, channel="master", kind="respawn"))
        except Exception:  # the control socket while the new master starts
            return False

    wait_for(logged, f"master/respawn for {patterns} in the event log", timeout=120)
    wait_for(lambda: isinstance(call("status").get("budget"), dict), "the new master",
             timeout=120)
    assert agentd_pid() == pid


def refused_as_nobody(n: int) -> None:
    """``n`` requests refused by policy: uid 1000 in group 0 reaches the socket (0660)
    but no identity of the policy names it."""
    def demote() -> None:
        os.setgroups([])
        os.setgid(0)
        os.setuid(1000)

    for _ in range(n):
        r = subprocess.run(["agentctl", "patterns", "rollback"], capture_output=True,
                           text=True, preexec_fn=demote, timeout=60)
        assert r.returncode == 1 and "error[E_POLICY_ROLE]" in r.stderr, r.stderr


def test_master_control_probing(clean: dict[str, Any]) -> None:
    # the control: four refusals within the minute are not yet probing
    since, t0 = last_seq(), time.time() - 1
    pid = agentd_pid()
    refused_as_nobody(4)
    denied = [e for e in call("events", n=200, channel="agent", kind="control-denied")
              if e["seq"] > since]
    assert [(e["attrs"]["uid"], e["attrs"]["op"]) for e in denied] == \
        [(1000, "patterns.rollback")] * 4
    time.sleep(1)
    assert alerts(since, "master-control-probing") == []
    refused_as_nobody(1)
    alert = expect_logged_alert("master-control-probing", t0)
    (link,) = alert["attrs"]["chain"]
    assert link["count"] == 5 and link["keys"].get("uid", 1000) == 1000
    respawned({"master-control-probing"}, pid, t0)


def test_master_probe_then_tamper(clean: dict[str, Any]) -> None:
    t0 = time.time() - 1
    pid = agentd_pid()
    refused_as_nobody(1)
    time.sleep(0.5)
    os.kill(pid, signal.SIGWINCH)
    alert = expect_logged_alert("master-probe-then-tamper", t0)
    assert [s for s, _, _ in chain_of(alert)] == ["probe", "tamper"]
    respawned({"master-probe-then-tamper", "master-signalled"}, pid, t0)
