"""Channel 2's process and host halves against the live agentd in the box (issue 11).

* A cell cannot change a host sysctl: ``/proc/sys`` is read-only in every cell, a fresh
  proc mount or a read-write remount is refused (and reported: a ``syscall`` event of the
  cell), and what it reads of ``net.*`` is its own netns's copy; the host's values are
  unchanged and agentd's sysctl check finds no drift.  Control: the host's root
  writing a watched sysctl is reported (``host/sysctl``, cell null, a ``notice``).
* A cell cannot create a device node (``mknod`` of a character or block device is
  refused and reported, a ``syscall`` event of the cell); the controls: a FIFO in the
  cell, and the host's root making the same node.
* A busy benign cell (a shell forking and exec'ing in a loop) raises nothing above
  ``info`` and does not flood: its ``proc`` events are coalesced by the bus into a burst,
  a rate and ``suppressed`` summaries, while agentd counts every message.
* Host-side changes nobody asked the master for (a link added, a tmpfs mounted, the
  clock set, by the box's root) are ``host`` events of cell null, each a ``notice``.
* ``agentctl ps --tree web`` shows a cell's process tree with the cell's pids.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from cellkit import call, clean, ctl, probe, sh, start, wait_for

pytestmark = pytest.mark.usefixtures(clean.__name__)


def events(**filters: Any) -> list[dict[str, Any]]:
    return list(call("events", n=500, **filters))


def since(evs: list[dict[str, Any]], seq: int) -> list[dict[str, Any]]:
    return [e for e in evs if e["seq"] > seq]


def last_seq() -> int:
    evs = events()
    return max((e["seq"] for e in evs), default=0)


def host_sysctl(name: str) -> str:
    return Path("/proc/sys/" + name.replace(".", "/")).read_text().strip()


def status(field: str) -> dict[str, Any]:
    return dict(call("status")[field])


def hint_sysctls() -> None:
    """A link added and removed on the host: a hint to agentd's sysctl check."""
    sh("ip", "link", "add", "hint0", "type", "veth", "peer", "name", "hint1")
    sh("ip", "link", "del", "hint0")


TMP = '[[writable]]\nkind = "tmpfs"\npath = "/tmp"\nsize = "1M"\n'
SYSCTL_PROBE = r"""
out = {}
def write(path, value):
    try:
        with open(path, "w") as f:
            f.write(value)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
out["core_pattern"] = write("/proc/sys/kernel/core_pattern", "|/tmp/evil")
out["modprobe"] = write("/proc/sys/kernel/modprobe", "/tmp/evil")
out["ip_forward"] = write("/proc/sys/net/ipv4/ip_forward", "0")
out["net_conf"] = sorted(os.listdir("/proc/sys/net/ipv4/conf"))
out["read_modprobe"] = open("/proc/sys/kernel/modprobe").read().strip()
os.makedirs("/tmp/p", exist_ok=True)
out["mount_proc"] = call(libc.mount, b"proc", b"/tmp/p", b"proc", 0, None)
out["remount_rw"] = call(libc.mount, None, b"/proc/sys", None, 0x20 | 0x1000, None)
result(out)
"""


def test_a_cell_cannot_change_a_host_sysctl() -> None:
    before = {n: host_sysctl(n) for n in ("kernel.core_pattern", "kernel.modprobe",
                                          "net.ipv4.ip_forward")}
    seq = last_seq()
    r = probe("host-sysctl", SYSCTL_PROBE, resources={"memory_max": "64M"}, extra=TMP)
    # every write refused: /proc/sys is a read-only mount in the cell, for the cell's own
    # namespaced copies (net.*) as for the host-global ones (kernel.*)
    assert r["core_pattern"] in ("EROFS", "EACCES", "EPERM"), r
    assert r["modprobe"] in ("EROFS", "EACCES", "EPERM"), r
    assert r["ip_forward"] in ("EROFS", "EACCES", "EPERM"), r
    assert r["mount_proc"] == "EPERM" and r["remount_rw"] == "EPERM", r
    # what the cell reads of net.* is its own netns's copy (its own links' settings, none
    # of the host's), of kernel.* the host's (read-only)
    host_conf = sorted(os.listdir("/proc/sys/net/ipv4/conf"))
    assert "lo" in r["net_conf"] and r["net_conf"] != host_conf, (r, host_conf)
    assert not set(r["net_conf"]) & (set(host_conf) - {"all", "default", "lo", "eth0"}), r
    assert r["read_modprobe"] == before["kernel.modprobe"]
    assert {n: host_sysctl(n) for n in before} == before
    # the mounts that would have made /proc/sys writable were trapped, refused and
    # reported by channel 2's seccomp half (the writes themselves fail in the VFS: EROFS)
    refusals = [e for e in since(events(cell="host-sysctl", channel="syscall"), seq)
                if e["attrs"]["syscall"] == "mount"]
    assert refusals and all(e["attrs"]["verdict"] == "denied" for e in refusals), refusals
    checks = status("host")["sysctl_checks"]
    hint_sysctls()
    wait_for(lambda: status("host")["sysctl_checks"] > checks, "a sysctl check")
    assert {n: status("host")["sysctls"][n] for n in before} == before
    assert not [e for e in since(events(channel="host", kind="sysctl"), seq)]


def test_the_hosts_root_writing_a_watched_sysctl_is_reported() -> None:
    """The control of the test above: the same check sees a real change."""
    name, path = "kernel.domainname", Path("/proc/sys/kernel/domainname")
    old = path.read_text().strip()
    seq = last_seq()
    try:
        path.write_text("attack-test\n")
        hint_sysctls()
        hit = wait_for(lambda: since(events(channel="host", kind="sysctl"), seq),
                       "host/sysctl of kernel.domainname")
    finally:
        path.write_text(old + "\n")
    [e] = hit
    assert (e["cell"], e["severity"]) == (None, "notice"), e
    assert e["attrs"] == {"name": name, "old": old, "new": "attack-test", "by": None}


MKNOD_PROBE = r"""
import stat
out = {}
out["chr"] = oserr(os.mknod, "/tmp/mem", stat.S_IFCHR | 0o600, os.makedev(1, 1))
out["blk"] = oserr(os.mknod, "/tmp/sda", stat.S_IFBLK | 0o600, os.makedev(8, 0))
out["exists"] = os.path.exists("/tmp/mem") or os.path.exists("/tmp/sda")
out["fifo"] = oserr(os.mkfifo, "/tmp/fifo")
out["file"] = oserr(lambda: open("/tmp/plain", "w").close())
result(out)
"""


def test_a_cell_cannot_create_a_device_node() -> None:
    seq = last_seq()
    r = probe("host-mknod", MKNOD_PROBE, resources={"memory_max": "64M"},
              extra=TMP)
    assert r["chr"] == "EPERM" and r["blk"] == "EPERM" and not r["exists"], r
    # controls in the cell: the same call for a FIFO, and a plain file, are allowed
    assert r["fifo"] == "ok" and r["file"] == "ok", r
    # reported: each refused node is a syscall event of the cell (channel 2's seccomp half)
    refusals = [e for e in since(events(cell="host-mknod", channel="syscall"), seq)
                if e["attrs"]["syscall"] in ("mknod", "mknodat")]
    assert len(refusals) >= 2 and all(e["attrs"]["verdict"] == "denied" and
                                      e["severity"] != "info" for e in refusals), refusals
    # control: the box's root may (the same call, outside every cell)
    node = Path("/tmp/attack-test-mem")
    node.unlink(missing_ok=True)
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(1, 1))
    try:
        assert stat.S_ISCHR(node.stat().st_mode)
    finally:
        node.unlink()


def test_a_busy_benign_cell_raises_nothing_and_does_not_flood() -> None:
    seq = last_seq()
    proc0 = status("proc")
    assert proc0["running"] is True, proc0
    t0 = time.monotonic()
    start("busy", ["sh", "-c", "while :; do /bin/busybox true; done"])
    time.sleep(8)
    ctl("stop", "busy")
    span = time.monotonic() - t0
    proc1 = status("proc")
    ran = proc1["exec"] - proc0["exec"]
    assert ran > 100, (proc0, proc1)  # the loop ran: agentd saw every exec
    evs = since(events(cell="busy"), seq)
    loud = [e for e in evs if e["severity"] != "info" and e["channel"] != "lifecycle"]
    assert not loud, loud
    execs = [e for e in evs if e["channel"] == "proc" and e["kind"] == "exec"]
    # the bus's limit per (cell, channel, kind): a burst of 20, then 10/s
    assert 20 <= len(execs) <= 20 + 10 * span + 5, (len(execs), span)
    assert all(e["attrs"]["comm"] in ("true", "busybox", "") for e in execs[1:])
    summaries = wait_for(lambda: [e for e in since(events(cell="busy", kind="suppressed"),
                                                     seq) if e["attrs"]["kind"] == "exec"],
                         "a suppressed summary of busy's execs", timeout=30)
    assert sum(e["attrs"]["count"] for e in summaries) + len(execs) <= ran + 5
    assert sum(e["attrs"]["count"] for e in summaries) > 0


def test_host_changes_nobody_asked_for_are_events_of_the_host(tmp_path: Path) -> None:
    seq = last_seq()
    sh("ip", "link", "add", "hostev0", "type", "veth", "peer", "name", "hostev1")
    sh("ip", "link", "del", "hostev0")
    target = tmp_path / "mnt"
    target.mkdir()

    def mounts() -> list[dict[str, Any]]:
        return [e for e in since(events(channel="host", kind="mount"), seq)
                if e["attrs"]["target"] == str(target)]

    # the mount table is read after each change (diffed by mount id): a mount must live
    # until that read to be seen, so this one is unmounted only once it was reported
    sh("mount", "-t", "tmpfs", "-o", "size=64k", "attack-test", str(target))
    try:
        wait_for(mounts, "host/mount of the test's tmpfs")
    finally:
        sh("umount", str(target))
    time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME))

    def got() -> dict[str, list[dict[str, Any]]] | None:
        evs = since(events(channel="host"), seq)
        out = {"link": [e for e in evs if e["kind"] == "link"
                        and e["attrs"]["name"] == "hostev0"],
               "mount": mounts(),
               "clock": [e for e in evs if e["kind"] == "clock-set"]}
        return out if all(out.values()) and len(out["mount"]) >= 2 else None

    hit = wait_for(got, "host link, mount and clock events", timeout=30)
    for evs in hit.values():
        assert all(e["cell"] is None and e["severity"] == "notice" and
                   e["attrs"]["by"] is None for e in evs), evs
    assert {e["attrs"]["action"] for e in hit["link"]} >= {"add", "remove"}
    assert [e["attrs"]["action"] for e in hit["mount"]][:2] == ["mount", "umount"]
    assert hit["mount"][0]["attrs"]["fstype"] == "tmpfs"
    assert abs(hit["clock"][0]["attrs"]["delta_s"]) < 1.0
    uevents = since(events(channel="host", kind="uevent"), seq)
    assert any(e["attrs"].get("ifname") == "hostev0" for e in uevents), uevents


def test_ps_tree_shows_a_cells_processes() -> None:
    start("web", ["sh", "-c", "sleep 1000 & sleep 1000 & wait"])

    def tree() -> dict[str, Any] | None:
        d = dict(ctl("ps", "--tree", "web"))
        comms = [r["comm"] for r in d["procs"]]
        return d if comms == ["busybox", "sleep", "sleep"] else None

    d = wait_for(tree, "web's tree: busybox sh and two sleeps")
    root, *kids = d["procs"]
    assert (root["pid"], root["ppid"], root["depth"]) == (1, 0, 0), d
    assert all(k["ppid"] == 1 and k["depth"] == 1 and k["pid"] > 1 for k in kids), d
    assert all(k["hpid"] != k["pid"] for k in d["procs"])  # host pids are not the cell's
    text = sh("agentctl", "ps", "--tree", "web").stdout.splitlines()
    assert text[0].startswith("cell web") and "3 processes" in text[0], text
    assert "└─" in text[3] and "sleep" in text[3], text
    # the process channel saw them start: events of cell web with the cell's pids
    forks = events(cell="web", channel="proc", kind="fork")
    assert {e["attrs"]["pid"] for e in forks} >= {k["pid"] for k in kids}, forks
    refused = sh("agentctl", "ps", "--tree", "nosuch", check=False)
    assert refused.returncode == 1 and "E_NOT_FOUND" in refused.stderr, refused
    assert json.loads(sh("agentctl", "--json", "ps").stdout)  # the plain listing still works
