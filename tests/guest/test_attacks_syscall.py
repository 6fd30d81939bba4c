"""Channel 2 in the box (issue 11): attacks from inside cells through system calls, each
blocked and reported on the event bus with the right cell, pid and channel, each with
its control (the same call working where it is allowed: on the box's host side, or in a
cell whose manifest grants the operation).

Probes are python snippets run as pid 1 of a cell (cellkit); each attack is one exact
raw syscall through ctypes, and the test reads the events agentd published.  The
allowed operations change the box (its host name, its clock): the root disk is a
throwaway snapshot, and each test puts back what it changed.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cellkit import (
    PROBE_LIB,
    SERVICES,
    call,
    clean,
    ctl,
    ps,
    py_image,
    start_probe,
    wait_for,
    write_manifest,
)

from agent.core import syscalls as abi

__all__ = ["clean"]

NR = {n: abi.syscall_nr(n) for n in (
    "finit_module", "init_module", "mount", "umount2", "reboot", "clock_settime", "mknodat",
    "ptrace", "bpf", "io_uring_setup", "socket", "sethostname", "getpid")}  # fmt: skip
SYSCALL = r'''
import struct, time
libc.syscall.restype = ctypes.c_long
def sc(nr, *args):
    """errno name (or ok) of one raw syscall; bytes arguments become pointers."""
    keep, cargs = [], []
    for a in args:
        if isinstance(a, bytes):
            keep.append(ctypes.create_string_buffer(a, max(len(a), 1)))
            cargs.append(ctypes.c_long(ctypes.addressof(keep[-1])))
        else:
            cargs.append(ctypes.c_long(a))
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *cargs)
    return "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
'''
NRS = f"NR = {json.dumps(NR)}\n"
BPF_MAP = struct.pack("<IIII", 2, 4, 4, 1) + b"\0" * 56  # BPF_MAP_TYPE_ARRAY, 1 entry
ATTACKS = NRS + SYSCALL + rf'''
fd = os.open("/probes/probelib.py", os.O_RDONLY)
r = {{
    "finit_module": sc(NR["finit_module"], fd, b"", 0),
    "init_module": sc(NR["init_module"], b"\x7fELF" + b"\0" * 60, 64, b""),
    "mount": sc(NR["mount"], b"none", b"/tmp", b"tmpfs", 0, 0),
    "mount_proc": sc(NR["mount"], b"proc", b"/tmp", b"proc", 0, 0),
    "umount_sys": sc(NR["umount2"], b"/proc/sys", 2),
    "reboot": sc(NR["reboot"], 0xfee1dead, 672274793, 0x01234567, 0),
    "clock": sc(NR["clock_settime"], 0, struct.pack("<qq", int(time.time()) + 3600, 0)),
    "sysctl": oserr(lambda: open("/proc/sys/kernel/printk_ratelimit", "w").write("5")),
    "mknod": sc(NR["mknodat"], -100, b"/tmp/mem", 0o20600, (1 << 8) | 1),
    "ptrace": sc(NR["ptrace"], 0, 0, 0, 0),
    "bpf": sc(NR["bpf"], 0, {BPF_MAP!r}, 72),
    "io_uring": sc(NR["io_uring_setup"], 4, b"\0" * 120),
    "vsock": sc(NR["socket"], 40, 1, 0),
    "uevent": sc(NR["socket"], 16, 2, 15),
    # controls in the cell: the same calls where the policy allows them
    "fifo": sc(NR["mknodat"], -100, b"/tmp/fifo", 0o10600, 0),
    "inet": sc(NR["socket"], 2, 1, 0),
    "route": sc(NR["socket"], 16, 2, 0),
    "pid": os.getpid(),
}}
result(r)
time.sleep(100000)
'''
TMP = '[[writable]]\nkind = "tmpfs"\npath = "/tmp"\nsize = "1M"\n'


def _host(code: str) -> dict[str, Any]:
    """Run ``code`` (with the probes' helpers) on the box's host side, outside every cell
    and filter: the controls."""
    p = subprocess.run([sys.executable, "-c", PROBE_LIB + NRS + SYSCALL + code],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, p.stdout + p.stderr
    return dict(json.loads(line[-1].removeprefix("RESULT ")))


def _events(cell: str, kind: str | None = None) -> list[dict[str, Any]]:
    args: dict[str, Any] = {"n": 200, "cell": cell, "channel": "syscall"}
    if kind:
        args["kind"] = kind
    return list(call("events", **args))


def test_escape_attempts_are_blocked_and_reported_with_cell_pid_and_channel(
        clean: dict[str, Any]) -> None:  # fmt: skip
    row, r = start_probe("sc-attack", ATTACKS, extra=TMP)
    assert r["pid"] == 1
    want = {"finit_module": "EPERM", "init_module": "EPERM", "mount": "EPERM",
            "mount_proc": "EPERM", "umount_sys": "EPERM", "reboot": "EPERM", "clock": "EPERM",
            "sysctl": "EROFS", "mknod": "EPERM", "ptrace": "EPERM", "bpf": "EPERM",
            "io_uring": "EPERM", "vsock": "EAFNOSUPPORT", "uevent": "EAFNOSUPPORT",
            "fifo": "ok", "inet": "ok", "route": "ok"}  # fmt: skip
    assert {k: r[k] for k in want} == want, r
    traps = wait_for(lambda: len(_events("sc-attack", "trap")) >= 7 and
                     _events("sc-attack", "trap"), "the trap events")
    denied = wait_for(lambda: len(_events("sc-attack", "denied")) >= 6 and
                      _events("sc-attack", "denied"), "the denied events")
    seen = [(e["attrs"]["syscall"], e["attrs"].get("op"), e["attrs"]["verdict"]) for e in traps]
    assert sorted(seen) == sorted([
        ("finit_module", "none", "denied"), ("init_module", "none", "denied"),
        ("mount", "mount_usb", "denied"), ("mount", "mount_usb", "denied"),
        ("umount2", "mount_usb", "denied"), ("reboot", "reboot", "denied"),
        ("clock_settime", "set_time", "denied")]), seen
    assert sorted(e["attrs"]["syscall"] for e in denied) == sorted(
        ["mknodat", "ptrace", "bpf", "io_uring_setup", "socket", "socket"])
    for e in traps + denied:  # the right cell, pid and channel, and who it was
        assert e["cell"] == "sc-attack" and e["channel"] == "syscall", e
        a = e["attrs"]
        assert (a["pid"], a["hpid"], a["comm"]) == (1, row["pid"], "python3"), a
        assert a["exe"].endswith("/python3.11") and e["severity"] == "notice", a
    # controls: where nothing filters, the same calls reach the kernel and work
    host = _host(rf'''
import tempfile
d = tempfile.mkdtemp()
fd = os.open("/etc/hostname", os.O_RDONLY)
pid = os.fork()
if pid == 0:
    os._exit(0 if sc(NR["ptrace"], 0, 0, 0, 0) == "ok" else 1)
rate = open("/proc/sys/kernel/printk_ratelimit").read()
r = {{"finit_module": sc(NR["finit_module"], fd, b"", 0),
      "mount": sc(NR["mount"], b"none", d.encode(), b"tmpfs", 0, 0),
      "umount": sc(NR["umount2"], d.encode(), 0),
      "sysctl": oserr(lambda: open("/proc/sys/kernel/printk_ratelimit", "w").write(rate)),
      "mknod": sc(NR["mknodat"], -100, (d + "/mem").encode(), 0o20600, (1 << 8) | 1),
      "ptrace": os.waitpid(pid, 0)[1] == 0,
      "bpf": sc(NR["bpf"], 0, {BPF_MAP!r}, 72),
      "io_uring": sc(NR["io_uring_setup"], 4, b"\0" * 120),
      "uevent": sc(NR["socket"], 16, 2, 15)}}
os.unlink(d + "/mem"); os.rmdir(d)
result(r)
''')
    assert host["finit_module"] == "ENOEXEC", host  # the loader ran, and refused a text file
    assert host["mount"] == host["umount"] == host["sysctl"] == host["mknod"] == "ok", host
    assert host["ptrace"] is True and host["bpf"] == "ok" and host["io_uring"] == "ok", host
    assert host["uevent"] == "ok", host


# A 32-bit ARM program: getpid (r7 = 20), then exit(7).  The cell filter sends its first
# call to the master (a foreign ABI), which kills it; unfiltered, it exits 7.
ARM32_CODE = bytes.fromhex("1470a0e3" "000000ef" "0170a0e3" "0700a0e3" "000000ef")


def arm32_elf() -> bytes:
    base, hdr = 0x10000, 52 + 32
    size = hdr + len(ARM32_CODE)
    ehdr = struct.pack("<16sHHIIIIIHHHHHH", b"\x7fELF\x01\x01\x01" + b"\0" * 9, 2, 40, 1,
                       base + hdr, 52, 0, 0x05000200, 52, 32, 1, 0, 0, 0)  # fmt: skip
    phdr = struct.pack("<IIIIIIII", 1, 0, base, base, size, size, 5, 0x1000)
    return ehdr + phdr + ARM32_CODE


def test_a_foreign_abi_process_is_killed_and_reported(clean: dict[str, Any]) -> None:
    image = Path(py_image())
    prog = image / "probes" / "arm32"
    prog.write_bytes(arm32_elf())
    prog.chmod(0o755)
    try:
        control = subprocess.run([str(prog)], timeout=30)  # on the host: runs to exit(7)
    except OSError as exc:  # ENOEXEC: a kernel without CONFIG_COMPAT runs no arm32 code
        pytest.skip(f"this box cannot run arm32 programs: {exc}")
    assert control.returncode == 7, control
    write_manifest("sc-arm32", [], command="/probes/arm32", image=str(image), oneshot=True)
    try:
        ctl("run", "sc-arm32")
        killed = wait_for(lambda: _events("sc-arm32", "killed"), "the killed event", timeout=60)
    finally:
        (SERVICES / "sc-arm32.toml").unlink()
    a = killed[0]["attrs"]
    assert (a["syscall"], a["arch"], a["verdict"], a["pid"]) == ("arm_20", "arm", "killed", 1)
    assert killed[0]["severity"] == "alert" and killed[0]["channel"] == "syscall"
    wait_for(lambda: "sc-arm32" not in ps(), "the killed oneshot cell to go", timeout=60)


def test_host_uevents_do_not_reach_cells(clean: dict[str, Any]) -> None:
    """A cell's netns belongs to the host's user namespace, so a uevent socket in it
    would hear the host's hotplug events (USB vendor, serial): the socket is refused and
    reported, and no other path (/sys, the uevent helper) is in the cell."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, abi.NETLINK_KOBJECT_UEVENT)
    s.bind((0, 1))
    s.settimeout(10)
    Path("/sys/class/net/lo/uevent").write_text("change")
    heard = s.recv(4096).split(b"\0")[0].decode()
    s.close()
    assert heard == "change@/devices/virtual/net/lo", heard  # the control: the host hears
    _, r = start_probe("sc-uevent", NRS + SYSCALL + r'''
r = {"raw": sc(NR["socket"], 16, 3, 15), "dgram": sc(NR["socket"], 16, 2, 15),
     "sys": os.listdir("/sys"), "helper": os.path.exists("/sys/kernel/uevent_helper"),
     "hotplug": oserr(lambda: open("/proc/sys/kernel/hotplug", "w").write("/x")),
     "udev": os.path.exists("/run/udev")}
result(r)
time.sleep(100000)
''')
    assert r == {"raw": "EAFNOSUPPORT", "dgram": "EAFNOSUPPORT", "sys": [], "helper": False,
                 "hotplug": r["hotplug"], "udev": False}, r  # fmt: skip
    assert r["hotplug"] in ("EROFS", "EACCES", "ENOENT"), r
    got = wait_for(lambda: len(_events("sc-uevent", "denied")) >= 2 and
                   _events("sc-uevent", "denied"), "the denied uevent sockets")
    assert {e["attrs"]["syscall"] for e in got} == {"socket"}


HOSTNAME = NRS + SYSCALL + r'''
r = {"set": sc(NR["sethostname"], b"agent-box-renamed", 17),
     "bad": sc(NR["sethostname"], b"evil;reboot", 11),
     "cell_name": socket.gethostname()}
result(r)
time.sleep(100000)
'''


def test_set_hostname_granted_works_end_to_end_and_is_reported(clean: dict[str, Any]) -> None:
    before = socket.gethostname()
    try:
        _, r = start_probe("sc-namer", HOSTNAME, extra='[privileges]\nops = ["set_hostname"]\n')
        assert r["set"] == "ok" and r["bad"] == "EINVAL", r
        assert socket.gethostname() == "agent-box-renamed"  # the box's own name
        assert r["cell_name"] == "sc-namer"  # the cell keeps its own UTS namespace
        got = wait_for(lambda: len(_events("sc-namer", "trap")) >= 2 and
                       _events("sc-namer", "trap"), "the trap events")
        seen = [(e["attrs"]["verdict"], e["attrs"].get("name"), e["attrs"].get("error"))
                for e in got]
        assert sorted(seen, key=str) == sorted([("allowed", "agent-box-renamed", None),
                                                ("denied", None, "EINVAL")], key=str), seen
        assert all(e["attrs"]["op"] == "set_hostname" and e["attrs"]["pid"] == 1 for e in got)
        # refused: the same call from a cell whose manifest does not grant it
        socket.sethostname(before)
        _, r2 = start_probe("sc-namer2", HOSTNAME)
        assert r2["set"] == "EPERM" and socket.gethostname() == before, r2
    finally:
        socket.sethostname(before)


CLOCK = NRS + SYSCALL + r'''
t0 = time.time()
r = {"set": sc(NR["clock_settime"], 0, struct.pack("<qq", int(t0) + 600, 0)),
     "after": time.time() - t0}
result(r)
time.sleep(100000)
'''


def test_set_time_granted_moves_the_box_clock_and_is_reported(clean: dict[str, Any]) -> None:
    mono, wall = time.monotonic(), time.time()
    try:
        _, r = start_probe("sc-clock", CLOCK, extra='[privileges]\nops = ["set_time"]\n')
        assert r["set"] == "ok" and r["after"] > 500, r
        assert time.time() - (wall + time.monotonic() - mono) > 500  # the box's clock moved
        (ev,) = wait_for(lambda: _events("sc-clock", "trap"), "the trap event")
        assert ev["attrs"]["verdict"] == "allowed" and ev["attrs"]["op"] == "set_time"
        assert 500 < ev["attrs"]["delta_s"] < 700, ev
    finally:
        os.system(f"date -s @{int(wall + time.monotonic() - mono)} >/dev/null")
    _, r2 = start_probe("sc-clock2", CLOCK)
    assert r2["set"] == "EPERM" and r2["after"] < 500, r2
    assert abs(time.time() - (wall + time.monotonic() - mono)) < 30
