"""Smoke tests of the emulated box: the kernel features every later issue relies on.

These check the kernel and the image, not the agent's own adapters, so they
use the kernel interfaces directly (ctypes, /sys, iproute2, nft).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cellkit import CGROOT, sh


def test_machine_is_aarch64() -> None:
    assert platform.machine() == "aarch64"


def test_cgroup_v2_mounted_with_controllers() -> None:
    mounts = Path("/proc/self/mounts").read_text().split("\n")
    assert any(m.split()[1:3] == ["/sys/fs/cgroup", "cgroup2"] for m in mounts if m)
    have = set((CGROOT / "cgroup.controllers").read_text().split())
    assert {"cpu", "memory", "pids", "io"} <= have


@pytest.fixture
def subtree() -> Iterator[Path]:
    top = CGROOT / f"smoke-{uuid.uuid4().hex[:6]}"
    top.mkdir()
    try:
        yield top
    finally:
        for d in sorted(top.rglob("*"), reverse=True):
            if d.is_dir():
                d.rmdir()
        top.rmdir()


def test_controllers_usable_from_agent_subtree(subtree: Path) -> None:
    (CGROOT / "cgroup.subtree_control").write_text("+cpu +memory +pids +io")
    (subtree / "cgroup.subtree_control").write_text("+cpu +memory +pids +io")
    leaf = subtree / "cell"
    leaf.mkdir()
    assert set((leaf / "cgroup.controllers").read_text().split()) >= {"cpu", "memory", "pids",
                                                                       "io"}
    (leaf / "cpu.max").write_text("50000 100000")
    (leaf / "memory.max").write_text(str(64 << 20))
    (leaf / "pids.max").write_text("5")
    (leaf / "io.weight").write_text("default 200")
    assert (leaf / "cpu.max").read_text().split() == ["50000", "100000"]
    assert int((leaf / "memory.max").read_text()) == 64 << 20
    # pids.max really holds: a shell in the leaf cannot fork past it.
    p = subprocess.Popen(["sh", "-c", "read x; for i in 1 2 3 4 5 6 7 8; do sleep 5 & done; "
                          "wait"], stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (leaf / "cgroup.procs").write_text(str(p.pid))
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events = dict(ln.split() for ln in (leaf / "pids.events").read_text().splitlines())
            if int(events["max"]) > 0:
                break
            time.sleep(0.1)
        assert int(events["max"]) > 0
        assert int((leaf / "pids.current").read_text()) <= 5
    finally:
        (leaf / "cgroup.kill").write_text("1")
        p.wait(timeout=10)
        for _ in range(100):
            if not (leaf / "cgroup.procs").read_text().strip():
                break
            time.sleep(0.05)


def test_pyroute2_bridge_vlan_filtering_on_veth() -> None:
    from pyroute2 import IPRoute

    br, host, peer = "smkbr0", "smkv0", "smkv1"
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=br, kind="bridge", br_vlan_filtering=1)
            ipr.link("add", ifname=host, kind="veth", peer=peer)
            bri = ipr.link_lookup(ifname=br)[0]
            hi = ipr.link_lookup(ifname=host)[0]
            ipr.link("set", index=hi, master=bri)
            ipr.link("set", index=bri, state="up")
            ipr.link("set", index=hi, state="up")
            ipr.vlan_filter("add", index=hi, vlan_info={"vid": 100, "flags": 6})  # pvid+untagged
            ipr.vlan_filter("del", index=hi, vlan_info={"vid": 1})
            detail = json.loads(sh("ip", "-d", "-j", "link", "show", br).stdout)[0]
            assert detail["linkinfo"]["info_data"]["vlan_filtering"] == 1
            vlans = json.loads(sh("bridge", "-j", "vlan", "show", "dev", host).stdout)
            entries = [v for d in vlans if d["ifname"] == host for v in d["vlans"]]
            assert entries == [{"vlan": 100, "flags": ["PVID", "Egress Untagged"]}]
        finally:
            for name in (host, br):
                idx = ipr.link_lookup(ifname=name)
                if idx:
                    ipr.link("del", index=idx[0])


def test_nftables_loads_a_table() -> None:
    nft = shutil.which("nft")
    assert nft, "nft missing from the image"
    ruleset = ("table inet smoke {\n chain input {\n  type filter hook input priority 0;"
               " policy accept;\n  tcp dport 9 drop\n }\n}\n")
    try:
        r = subprocess.run([nft, "-f", "-"], input=ruleset, text=True, capture_output=True)
        assert r.returncode == 0, r.stderr
        tables = json.loads(sh(nft, "-j", "list", "tables").stdout)["nftables"]
        assert {"family": "inet", "name": "smoke"} in [
            {"family": t["table"]["family"], "name": t["table"]["name"]}
            for t in tables if "table" in t]
    finally:
        sh(nft, "delete", "table", "inet", "smoke", check=False)


# --- seccomp user notification, straight from the kernel ABI ---------------------------------

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
AUDIT_ARCH_AARCH64 = 0xC00000B7
NR_SECCOMP_AARCH64 = 277
NR_MKDIRAT_AARCH64 = 34
NOTIF_RECV = 0xC0502100  # _IOWR('!', 0, struct seccomp_notif)  (80 bytes)
NOTIF_SEND = 0xC0182101  # _IOWR('!', 1, struct seccomp_notif_resp)  (24 bytes)


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def _filter_trapping(nr: int) -> bytes:
    ld_arch = _bpf(0x20, 0, 0, 4)          # A = data.arch
    jeq_arch = _bpf(0x15, 1, 0, AUDIT_ARCH_AARCH64)
    allow0 = _bpf(0x06, 0, 0, SECCOMP_RET_ALLOW)
    ld_nr = _bpf(0x20, 0, 0, 0)            # A = data.nr
    jeq_nr = _bpf(0x15, 0, 1, nr)
    notif = _bpf(0x06, 0, 0, SECCOMP_RET_USER_NOTIF)
    allow = _bpf(0x06, 0, 0, SECCOMP_RET_ALLOW)
    return b"".join([ld_arch, jeq_arch, allow0, ld_nr, jeq_nr, notif, allow])


def test_seccomp_user_notification_and_pidfd(tmp_path: Path) -> None:
    assert "user_notif" in Path("/proc/sys/kernel/seccomp/actions_avail").read_text()
    libc = ctypes.CDLL(None, use_errno=True)
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    target = tmp_path / "made-by-child"
    pid = os.fork()
    if pid == 0:  # child: install the filter, hand the listener over, then mkdir
        try:
            parent_sock.close()
            prog = _filter_trapping(NR_MKDIRAT_AARCH64)
            buf = ctypes.create_string_buffer(prog)
            fprog = struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
            fbuf = ctypes.create_string_buffer(fprog)
            libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            fd = libc.syscall(NR_SECCOMP_AARCH64, SECCOMP_SET_MODE_FILTER,
                              SECCOMP_FILTER_FLAG_NEW_LISTENER, fbuf)
            if fd < 0:
                os._exit(100)
            socket.send_fds(child_sock, [b"x"], [fd])
            os.close(fd)
            try:
                os.mkdir(target)
                os._exit(0)
            except PermissionError:
                os._exit(42)  # the master's verdict reached us
        except BaseException:
            os._exit(101)
    child_sock.close()
    pidfd = os.pidfd_open(pid)
    try:
        _, fds, _, _ = socket.recv_fds(parent_sock, 1, 1)
        assert len(fds) == 1, "no listener fd received"
        listener = fds[0]
        r, _, _ = select.select([listener], [], [], 20)
        assert r, "no notification within 20 s"
        notif = bytearray(80)
        import fcntl

        fcntl.ioctl(listener, NOTIF_RECV, notif)
        nid, npid, _flags, nr, arch = struct.unpack_from("QIIiI", notif)
        assert (npid, nr, arch) == (pid, NR_MKDIRAT_AARCH64, AUDIT_ARCH_AARCH64)
        resp = bytearray(struct.pack("QqiI", nid, 0, -1, 0))  # error = -EPERM
        fcntl.ioctl(listener, NOTIF_SEND, resp)
        os.close(listener)
        # The pidfd becomes readable when the child exits.
        r, _, _ = select.select([pidfd], [], [], 20)
        assert r, "pidfd did not report the exit"
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 42
        assert not target.exists()
    finally:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        os.close(pidfd)


def test_agent_and_dependencies_import() -> None:
    code = ("import agent, pyroute2, cbor2; print(agent.__version__, agent.__file__); "
            "print(cbor2.loads(cbor2.dumps({'a': 1})))")
    out = sh("python3", "-c", code).stdout
    assert "/usr/lib/python3/dist-packages/agent/" in out  # the installed wheel
    assert "{'a': 1}" in out


def test_agentctl_status_answers_from_started_agentd() -> None:
    # agentd was started by the overlay's init script (/etc/init.d/S50agentd).
    r = sh("agentctl", "--json", "status", check=False)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["pid"] > 1
    assert status["machine"] == "aarch64"
    assert status["cgroup"] == "v2"


def test_agentd_logs_the_kernel_feature_report_at_start() -> None:
    """agentd logs what `agentctl checkconfig` reports when it starts."""
    import time as _time

    deadline = _time.monotonic() + 90
    log = ""
    while _time.monotonic() < deadline:
        log = Path("/var/log/agentd.log").read_text(errors="replace")
        if "features present" in log:
            break
        _time.sleep(0.5)
    line = next(ln for ln in log.splitlines() if "features present" in ln)
    assert f"kernel {os.uname().release}:" in line
    assert "/boot/config-" in line  # the box's kernel config was found
    assert not [ln for ln in log.splitlines() if "required feature" in ln], log
    # (the same report is published as a master/kernel-features event: tests/unit)
