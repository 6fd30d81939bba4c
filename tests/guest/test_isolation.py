"""Isolation that holds (issue 3, point 5; issue 10): one test per invariant, each against
real cells made by the live agentd, in both of its modes: with user namespaces (the
default) and without (``[userns] enabled = false``, for kernels built without
CONFIG_USER_NS).  Every test runs once per mode (the module fixture ``mode``); without
user namespaces the cells run as uid 1000, as agentd refuses host root there.

Probes are python snippets run as pid 1 of a cell whose image is the box's own python
(cellkit.py_image), so each check is an exact syscall with its errno; the cell prints
``RESULT {json}`` on stdout, read back with ``agentctl --json logs``.  docs/isolation.md
maps each invariant to its mechanism and to the test here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cellkit
import pytest
from cellkit import (
    CG,
    NETNS,
    PROBES_NOT_FROZEN,
    RUN_CELLS,
    SERVICES,
    agentd_pid,
    agentd_settings,
    clean,
    ctl,
    ensure_agentd,
    ps,
    refused,
    sh,
    timed_status,
    wait_for,
    warm_up,
    write_manifest,
)

from agent.core.grants import CAPABILITIES, CAPABILITY_MODES, NOUSERNS_KEEPABLE
from agent.core.sandbox import PROC_MASKED, PROC_READ_ONLY

__all__ = ["clean"]

MODE: dict[str, Any] = {"name": "userns", "uid": 0}
DATA = Path("/var/lib/agent/data")


@pytest.fixture(scope="module", autouse=True, params=["userns", "nouserns"])
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """agentd in the mode of the parameter for the tests of this module (cells in user
    namespaces, or without: then as uid 1000), and with channel 4's escapes-across-cells
    response set to record: every probe here is an escape attempt from a new cell, and
    the third within five minutes would be frozen before it reports (cellkit)."""
    ensure_agentd()
    warm_up()  # its demo-echo runs as uid 0: before the mode may refuse it
    with agentd_settings({("userns", "enabled"): request.param == "userns",
                          **PROBES_NOT_FROZEN}):
        MODE.update(name=request.param, uid=0 if request.param == "userns" else 1000)
        yield request.param
    MODE.update(name="userns", uid=0)


def start(name: str, args: list[str], **kw: Any) -> dict[str, Any]:
    kw.setdefault("uid", MODE["uid"])
    return cellkit.start(name, args, **kw)


def probe(name: str, code: str, **kw: Any) -> dict[str, Any]:
    kw.setdefault("uid", MODE["uid"])
    return cellkit.probe(name, code, **kw)


def start_probe(name: str, code: str, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    kw.setdefault("uid", MODE["uid"])
    return cellkit.start_probe(name, code, **kw)

SLEEPER = ["sleep", "100000"]
HTTPD = ["httpd", "-f", "-p", "8080", "-h", "/www"]


def ns_ids(pid: int | str) -> dict[str, str]:
    return {n: os.readlink(f"/proc/{pid}/ns/{n}")
            for n in ("mnt", "pid", "uts", "ipc", "net", "cgroup", "user")}


def test_cell_namespaces_differ_from_host_and_other_cells(clean: dict[str, Any]) -> None:
    a = start("iso-ns-a", SLEEPER)
    b = start("iso-ns-b", SLEEPER)
    host, na, nb = ns_ids(1), ns_ids(a["pid"]), ns_ids(b["pid"])
    shared = {"user"} if MODE["name"] == "nouserns" else set()  # the mode's one difference
    for kind in host:
        if kind in shared:
            assert na[kind] == nb[kind] == host[kind], kind
            continue
        assert na[kind] != host[kind] and nb[kind] != host[kind], kind
        assert na[kind] != nb[kind], kind  # every cell has its own, none shared


def _host_ids(pid: int) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return [int(x) for x in status.split("Uid:")[1].split()[:4]
            + status.split("Gid:")[1].split()[:4]]


def test_cell_root_is_never_host_root(clean: dict[str, Any]) -> None:
    """With user namespaces cell root is an unprivileged host uid; without them agentd
    refuses a uid-0 (or gid-0) service, and the cell runs as its own non-zero uid."""
    if MODE["name"] == "userns":
        _uid_map_is_not_zero_based_on_the_host()
        return
    write_manifest("iso-root", SLEEPER, uid=0)
    try:
        err = refused("run", "iso-root")
    finally:
        (SERVICES / "iso-root.toml").unlink()
    assert "error[E_POLICY_USERNS]" in err and "service.uid: uid 0" in err, err
    assert "hint:" in err and "non-zero uid and gid" in err, err
    assert "iso-root" not in ps()
    row = start("iso-uid-a", SLEEPER)  # the control: the same service as uid 1000 runs
    assert Path(f"/proc/{row['pid']}/uid_map").read_text().split() == ["0", "0", "4294967295"]
    assert _host_ids(row["pid"]) == [1000] * 8  # real, effective, saved, fs: host ids


def _uid_map_is_not_zero_based_on_the_host() -> None:
    a = start("iso-uid-a", SLEEPER)
    b = start("iso-uid-b", SLEEPER)
    ranges = []
    for row in (a, b):
        for f in ("uid_map", "gid_map"):
            inside, outside, count = map(int, Path(f"/proc/{row['pid']}/{f}").read_text().split())
            assert inside == 0 and outside >= 100000 and count >= 1, (f, outside)
        ranges.append(range(outside, outside + count))
        uids = Path(f"/proc/{row['pid']}/status").read_text().split("Uid:")[1].split()[:4]
        assert all(int(u) == ranges[-1].start for u in uids), uids  # cell root = base
        assert Path(f"/proc/{row['pid']}/setgroups").read_text().strip() == "deny"
    assert not set(ranges[0]) & set(ranges[1]), ranges


def test_cell_sees_only_its_own_processes(clean: dict[str, Any]) -> None:
    start("iso-proc-other", SLEEPER)
    host_pid = agentd_pid()
    r = probe("iso-proc", f"""
pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
result({{"pids": pids, "me": os.getpid(), "cmd": [open(f'/proc/{{p}}/cmdline','rb').read()
        .decode(errors='replace') for p in pids],
        "kill_agentd": oserr(os.kill, {host_pid}, 0), "kill_init_host": oserr(os.kill, 2, 0)}})
""")
    assert r["me"] == 1 and r["pids"] == [1], r  # not the host's, not iso-proc-other's
    assert "sleep" not in " ".join(r["cmd"]) and "agentd" not in " ".join(r["cmd"])
    assert r["kill_agentd"] == "ESRCH" and r["kill_init_host"] == "ESRCH", r


ALLOWED_MOUNTS = {"/", "/proc", "/dev", "/dev/null", "/dev/zero", "/dev/full", "/dev/random",
                  "/dev/urandom", "/dev/tty", "/dev/shm", "/etc/hosts",
                  *(f"/proc/{p}" for p in PROC_READ_ONLY + PROC_MASKED)}


def test_cell_sees_only_its_own_mounts(clean: dict[str, Any]) -> None:
    start("iso-mnt-other", HTTPD, uid=1000,
          extra='[[writable]]\nkind = "tmpfs"\npath = "/tmp"\nsize = "1M"\n')
    r = probe("iso-mnt", """
mi = [l.split() for l in open('/proc/self/mountinfo')]
result({"mounts": [[f[3], f[4]] for f in mi], "top": sorted(os.listdir('/')),
        "mnt_src": os.path.exists('/mnt/src'), "run": os.listdir('/run'),
        "sys": os.listdir('/sys')})
""")
    points = {p for _, p in r["mounts"]}
    assert points <= ALLOWED_MOUNTS, points - ALLOWED_MOUNTS
    root = [src for src, p in r["mounts"] if p == "/"]
    assert root and root[0].endswith("/pyimage"), r["mounts"]  # the image, not the host's /
    assert "/tmp" not in points  # iso-mnt-other's tmpfs is not here
    assert not r["mnt_src"] and r["run"] == [] and r["sys"] == [], r
    host_points = {line.split()[4] for line in Path("/proc/1/mountinfo").read_text().splitlines()}
    assert {"/mnt/src", "/run", "/sys/fs/cgroup"} <= host_points  # the control exists


def test_cell_has_its_own_hostname(clean: dict[str, Any]) -> None:
    host = socket.gethostname()
    other = start("iso-uts-other", SLEEPER)
    r = probe("iso-uts", "result({'hostname': socket.gethostname(), "
                         "'set': call(libc.sethostname, b'evil', 4), "
                         "'after': socket.gethostname()})")
    assert r["hostname"] == "iso-uts" and r["after"] == "iso-uts", r
    assert r["set"] == "EPERM"  # trapped, refused by the master
    assert socket.gethostname() == host != "iso-uts"
    seen = sh("nsenter", "-u", "-t", str(other["pid"]), "hostname").stdout.strip()
    assert seen == "iso-uts-other"


IPC_CREAT, O_RDONLY, O_RDWR, O_CREAT = 0o1000, 0, 2, 0o100
HOST_KEY, CELL_KEY = 0x150C0001, 0x150C0002


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6", use_errno=True)


def test_cell_sees_no_host_or_other_cell_ipc_objects(clean: dict[str, Any]) -> None:
    libc = _libc()
    shmid = libc.shmget(HOST_KEY, 4096, IPC_CREAT | 0o666)
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    mq = libc.mq_open(b"/iso-host-q", O_CREAT | O_RDWR, 0o666, None)
    assert mq >= 0, os.strerror(ctypes.get_errno())
    try:
        assert libc.shmget(HOST_KEY, 0, 0) == shmid  # the control: visible here
        # Cell A makes its own objects and stays up; the host and cell B must not see them.
        _, a = start_probe("iso-ipc-a", f"""
sid = libc.shmget({CELL_KEY}, 4096, {IPC_CREAT | 0o600})
q = libc.mq_open(b"/iso-cell-q", {O_CREAT | O_RDWR}, 0o600, None)
result({{"shm": sid, "mq": q, "host_shm": call(libc.shmget, {HOST_KEY}, 0, 0)}})
import time; time.sleep(100000)
""")
        assert a["shm"] >= 0 and a["mq"] >= 0, a  # it could make them
        assert a["host_shm"] == "ENOENT", a
        assert f"{CELL_KEY}" not in Path("/proc/sysvipc/shm").read_text()
        assert libc.shmget(CELL_KEY, 0, 0) == -1 and ctypes.get_errno() == errno.ENOENT
        assert libc.mq_open(b"/iso-cell-q", O_RDONLY) == -1
        assert ctypes.get_errno() == errno.ENOENT
        b = probe("iso-ipc-b", f"""
result({{"host_shm": call(libc.shmget, {HOST_KEY}, 0, 0),
        "cell_shm": call(libc.shmget, {CELL_KEY}, 0, 0),
        "host_mq": call(libc.mq_open, b"/iso-host-q", 0),
        "cell_mq": call(libc.mq_open, b"/iso-cell-q", 0),
        "sysvipc": open('/proc/sysvipc/shm').read().splitlines()[1:]}})
""")
        assert b == {"host_shm": "ENOENT", "cell_shm": "ENOENT", "host_mq": "ENOENT",
                     "cell_mq": "ENOENT", "sysvipc": []}, b
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID
        libc.mq_unlink(b"/iso-host-q")


def test_cell_sees_only_its_own_network(clean: dict[str, Any]) -> None:
    start("iso-net-other", HTTPD, uid=1000, network={"vlan": 140})
    r = probe("iso-net", """
result({"ifs": sorted(n for _, n in socket.if_nameindex()),
        "dev": sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]),
        "addrs": open('/proc/net/fib_trie').read()})
""", network={"vlan": 141})
    assert r["ifs"] == ["eth0", "lo"] and r["dev"] == ["eth0", "lo"], r
    host_links = set(os.listdir("/sys/class/net"))
    assert "agbr0" in host_links and len(host_links) > 3  # the control: the host has more
    other = ps()["iso-net-other"]["address"]
    assert other not in r["addrs"] and "10.77.41." in r["addrs"], r["addrs"]


def test_root_in_cell_cannot_raise_its_limits(clean: dict[str, Any]) -> None:
    row, r = start_probe("iso-limits", """
import resource
class RL(ctypes.Structure):
    _fields_ = [("cur", ctypes.c_uint64), ("max", ctypes.c_uint64)]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
big = RL(hard * 4, hard * 4)
def write(path, data):
    with open(path, 'w') as f:
        f.write(data)
result({"uid": os.getuid(), "nofile": [soft, hard],
        "raise_nofile": call(libc.setrlimit, resource.RLIMIT_NOFILE, ctypes.byref(big)),
        "cgroupfs": os.path.exists('/sys/fs/cgroup/memory.max'),
        "mount_cgroup2": call(libc.mount, b"none", b"/tmp", b"cgroup2", 0, None),
        "nice": call(libc.setpriority, 0, 0, -10),
        "sched_fifo": call(libc.sched_setscheduler, 0, 1, ctypes.byref(ctypes.c_int(1))),
        "sysctl": oserr(write, '/proc/sys/kernel/pid_max', '4194304'),
        "cg_write": oserr(write, '/sys/fs/cgroup/memory.max', 'max')})
import time; time.sleep(100000)
""", resources={"memory_max": "48M", "pids_max": 12})
    assert r["uid"] == MODE["uid"] and r["nofile"] == [1024, 4096], r  # the planned rlimit
    assert r["raise_nofile"] == "EPERM" and r["nice"] == "EACCES", r
    assert r["sched_fifo"] == "EPERM" and r["mount_cgroup2"] == "EPERM", r
    assert not r["cgroupfs"] and r["cg_write"] == "ENOENT", r
    assert r["sysctl"] in ("EROFS", "EACCES"), r
    leaf = CG / "iso-limits"
    assert (leaf / "memory.max").read_text().strip() == str(48 << 20)
    assert (leaf / "pids.max").read_text().strip() == "12"
    assert "Max open files            1024                 4096" in Path(
        f"/proc/{row['pid']}/limits").read_text()


def test_root_in_cell_cannot_leave_its_cgroup(clean: dict[str, Any]) -> None:
    row, r = start_probe("iso-cg", """
CLONE_NEWCGROUP, CLONE_NEWNS = 0x02000000, 0x00020000
r = {"cgroup": open('/proc/self/cgroup').read().strip(),
     "mount_cgroup2": call(libc.mount, b"none", b"/tmp", b"cgroup2", 0, None),
     "mount_cgroup1": call(libc.mount, b"none", b"/tmp", b"cgroup", 0, b"pids"),
     "fsopen": call(libc.syscall, 430, b"cgroup2", 0),
     "unshare_cgroup": call(libc.unshare, CLONE_NEWCGROUP),
     "unshare_mnt": call(libc.unshare, CLONE_NEWNS),
     "setns": call(libc.setns, os.open('/proc/self/ns/cgroup', os.O_RDONLY), 0)}
r["after"] = open('/proc/self/cgroup').read().strip()
result(r)
import time; time.sleep(100000)
""")
    assert r["cgroup"] == r["after"] == "0::/", r  # its leaf is its root
    assert r["mount_cgroup2"] == r["mount_cgroup1"] == "EPERM", r
    assert r["fsopen"] == "ENOSYS", r  # new mount API: ENOSYS so tools fall back to mount(2)
    assert r["unshare_cgroup"] == r["unshare_mnt"] == r["setns"] == "EPERM", r
    assert Path(f"/proc/{row['pid']}/cgroup").read_text().strip() == "0::/agent/iso-cg"
    assert str(row["pid"]) in (CG / "iso-cg" / "cgroup.procs").read_text().split()


def test_root_in_cell_cannot_change_its_seccomp_filter(clean: dict[str, Any]) -> None:
    r = probe("iso-seccomp", """
def status():
    return {k: v.strip() for k, v in (l.split(':', 1) for l in open('/proc/self/status'))
            if k in ('Seccomp', 'Seccomp_filters', 'NoNewPrivs')}
class Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]
allow = (Filter * 1)(Filter(0x06, 0, 0, 0x7fff0000))  # BPF_RET|BPF_K, SECCOMP_RET_ALLOW
prog = Prog(1, ctypes.cast(allow, ctypes.POINTER(Filter)))
r = {"before": status()}
r["clear_nnp"] = call(libc.prctl, 38, 0, 0, 0, 0)       # PR_SET_NO_NEW_PRIVS 0
r["mode_disabled"] = call(libc.prctl, 22, 0, 0, 0, 0)   # PR_SET_SECCOMP, DISABLED
r["add_allow_all"] = call(libc.prctl, 22, 2, ctypes.byref(prog), 0, 0)
r["ptrace_me"] = call(libc.ptrace, 0, 0, None, None)    # PTRACE_TRACEME
r["after"] = status()
r["sethostname"] = call(libc.sethostname, b"evil", 4)
r["unshare_user"] = call(libc.unshare, 0x10000000)
r["hostname"] = socket.gethostname()
result(r)
""")
    assert r["before"]["Seccomp"] == "2" and r["before"]["NoNewPrivs"] == "1", r
    assert r["clear_nnp"] == "EINVAL" and r["mode_disabled"] == "EINVAL", r
    # Stacking a filter is allowed (no_new_privs) but only ever adds restrictions: the
    # agent's filter still traps and denies afterwards.
    assert r["add_allow_all"] in ("ok", "EPERM", "EACCES"), r
    assert r["ptrace_me"] == "EPERM", r
    assert r["after"]["Seccomp"] == "2" and r["after"]["NoNewPrivs"] == "1", r
    assert int(r["after"]["Seccomp_filters"]) >= int(r["before"]["Seccomp_filters"]) >= 1
    assert r["sethostname"] == "EPERM" and r["unshare_user"] == "EPERM", r
    assert r["hostname"] == "iso-seccomp", r


def test_root_in_cell_cannot_remount_its_image_writable(clean: dict[str, Any]) -> None:
    r = probe("iso-remount", """
MS_RDONLY, MS_REMOUNT, MS_BIND, MNT_DETACH = 1, 32, 4096, 2
def root_opts():
    return [l.split()[5] for l in open('/proc/self/mountinfo') if l.split()[4] == '/'][0]
def create(path):
    open(path, 'w').close()
r = {"before": root_opts(),
     "remount_rw": call(libc.mount, None, b"/", None, MS_REMOUNT, None),
     "remount_bind_rw": call(libc.mount, None, b"/", None, MS_REMOUNT | MS_BIND, None),
     "bind_over": call(libc.mount, b"/tmp", b"/usr", None, MS_BIND, None),
     "umount_proc_sys": call(libc.umount2, b"/proc/sys", MNT_DETACH),
     "mount_setattr": call(libc.syscall, 442, -100, b"/", 0, None, 0),
     "write": oserr(create, '/probes/written-by-cell'),
     "write_etc": oserr(create, '/etc/passwd')}
r["after"] = root_opts()
result(r)
""")
    assert r["before"].split(",")[0] == "ro" and r["after"].split(",")[0] == "ro", r
    assert r["remount_rw"] == r["remount_bind_rw"] == r["bind_over"] == "EPERM", r
    assert r["umount_proc_sys"] == "EPERM" and r["mount_setattr"] == "ENOSYS", r
    assert r["write"] == "EROFS" and r["write_etc"] in ("EROFS", "EACCES"), r
    sh_r = probe("iso-remount-busybox", """
import subprocess
p = subprocess.run(["/bin/busybox", "mount", "-o", "remount,rw", "/"], capture_output=True)
result({"rc": p.returncode, "err": p.stderr.decode()})
""")
    assert sh_r["rc"] != 0 and ("denied" in sh_r["err"] or "not permitted" in sh_r["err"]), sh_r


def test_cell_cannot_reach_the_control_socket(clean: dict[str, Any]) -> None:
    sock = Path("/run/agent/agentd.sock")
    assert sock.is_socket()  # the control: it is there on the host
    host_pid = agentd_pid()
    r = probe("iso-ctl", f"""
def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(2)
    s.connect(path)
r = {{"exists": os.path.exists('{sock}'), "run": os.listdir('/run'),
     "connect": oserr(connect, '{sock}'),
     "via_proc": oserr(connect, '/proc/{host_pid}/root{sock}'),
     "via_proc1": oserr(connect, '/proc/1/root{sock}'),
     "abstract": oserr(connect, '\\0agentd'),
     "unix_table": [l.split()[-1] for l in open('/proc/net/unix').readlines()[1:]
                    if len(l.split()) > 7]}}
result(r)
""")
    assert not r["exists"] and r["run"] == [], r
    assert r["connect"] == "ENOENT" and r["via_proc"] == "ENOENT", r
    assert r["via_proc1"] == "ENOENT" and r["abstract"] == "ECONNREFUSED", r
    assert not any("agentd" in x for x in r["unix_table"]), r


def _read(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (x.split() for x in path.read_text().splitlines())}


def test_fork_bomb_stops_at_pids_max_and_agentctl_answers(clean: dict[str, Any]) -> None:
    start("iso-forkbomb", ["sh", "-c", "f() { f | f & }; f & exec sleep 100000"],
          resources={"pids_max": 16, "cpu_max": "500m"})
    leaf = CG / "iso-forkbomb"
    wait_for(lambda: _read(leaf / "pids.events")["max"] > 0, "the bomb to hit pids.max")
    took = []
    for _ in range(5):
        assert int((leaf / "pids.current").read_text()) <= 16
        took.append(timed_status())
        time.sleep(0.5)
    assert _read(leaf / "pids.events")["max"] > 0
    assert ps()["iso-forkbomb"]["state"] == "running"
    t = time.monotonic()
    assert ctl("stop", "iso-forkbomb")["state"] == "destroyed"
    print(f"status latencies under the bomb: {[round(x, 2) for x in took]}; "
          f"stop took {time.monotonic() - t:.1f} s")


def test_memory_hog_is_held_by_its_own_limit(clean: dict[str, Any]) -> None:
    web = start("iso-neighbour", HTTPD, uid=1000, network={"vlan": 142})
    start_probe("iso-hog", """
import subprocess, time
result({"started": True})
while True:  # each child touches 64 MiB in a 16 MiB cell; pid 1 stays small
    subprocess.run(["/usr/bin/python3", "-S", "-c", "x = b'a' * (64 << 20)"])
    time.sleep(0.2)
""", resources={"memory_max": "16M"})
    leaf = CG / "iso-hog"

    def held() -> bool:
        # An OOM kill, or the kernel reclaiming it at its own max or high: the tuner
        # keeps memory.high an eighth below max, and on a loaded box the hog may crawl
        # there, throttled, for longer than a minute before it reaches max (seen once)
        e = _read(leaf / "memory.events")
        return e["oom_kill"] > 0 or e["max"] > 0 or e["high"] > 0

    wait_for(held, "iso-hog held at its own limits", timeout=60)
    for _ in range(3):
        timed_status()
        assert int((leaf / "memory.current").read_text()) <= 16 << 20
        time.sleep(0.3)
    assert ps()["iso-hog"]["state"] == "running"  # pid 1 survived; only the hog was killed
    n_web = _read(CG / "iso-neighbour" / "memory.events")
    assert n_web["oom_kill"] == 0 and n_web["max"] == 0
    # the neighbour still serves, the box is fine
    assert "hello" in http_get(ps()["iso-neighbour"]["address"])
    assert web["pid"] == ps()["iso-neighbour"]["pid"]
    mem = {x.split(":")[0]: int(x.split()[1]) for x in Path("/proc/meminfo").read_text()
           .splitlines()}
    assert mem["MemAvailable"] > 200_000  # kB


# -- network separation between VLANs (L2; routed reachability is the firewall's) --------

HTTP_GET = ("python3", "-c", "import sys, urllib.request as u; print(u.urlopen("
            "f'http://{sys.argv[1]}:8080/', timeout=4).read().decode())")


def http_get(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}:8080/", timeout=10) as r:
        return str(r.read().decode())


def _in_netns(cell: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return sh("nsenter", f"--net={NETNS / ('cell-' + cell)}", *argv, check=False,
              timeout=timeout)


def _mac(cell: str) -> str:
    out = sh("ip", "-n", f"cell-{cell}", "-o", "link", "show", "eth0").stdout
    return out.split("link/ether")[1].split()[0]


@pytest.fixture
def three_cells(clean: dict[str, Any]) -> dict[str, str]:
    """a and c on VLAN 150, b on VLAN 151, each serving HTTP; their addresses.  a's
    manifest may reach both b and c on 8080, so the firewalls allow a -> b as much as
    a -> c: what keeps a's frames from b is the VLAN alone."""
    peers = [{"cell": p, "ports": [8080], "proto": "tcp"} for p in ("iso-l2-b", "iso-l2-c")]
    start("iso-l2-b", HTTPD, uid=1000, network={"vlan": 151})
    start("iso-l2-c", HTTPD, uid=1000, network={"vlan": 150})
    start("iso-l2-a", HTTPD, uid=1000, network={"vlan": 150, "peers": peers})
    return {k: ps()[f"iso-l2-{k}"]["address"] for k in "abc"}


def test_cells_on_different_vlans_are_separate_at_l2(three_cells: dict[str, str]) -> None:
    a, b, c = three_cells["a"], three_cells["b"], three_cells["c"]
    gw_a = a.rsplit(".", 1)[0] + ".1"
    # Host root inside a's netns (more than cell root, which has no CAP_NET_RAW there).
    assert _in_netns("iso-l2-a", "arping", "-c", "2", "-w", "3", "-I", "eth0", gw_a
                     ).returncode == 0  # the control: ARP works on a's own VLAN
    assert _in_netns("iso-l2-a", "arping", "-c", "2", "-w", "3", "-I", "eth0", c
                     ).returncode == 0  # and reaches a cell on the same VLAN
    r = _in_netns("iso-l2-a", "arping", "-c", "2", "-w", "3", "-I", "eth0", b)
    assert r.returncode != 0 and "Received 0" in r.stdout, r.stdout
    # Unicast frames straight to b's MAC (forged neighbour, on-link route) do not arrive.
    sh("ip", "-n", "cell-iso-l2-a", "neigh", "replace", b, "lladdr", _mac("iso-l2-b"),
       "dev", "eth0", "nud", "permanent")
    sh("ip", "-n", "cell-iso-l2-a", "route", "add", f"{b}/32", "dev", "eth0")
    r = _in_netns("iso-l2-a", *HTTP_GET, b)
    assert r.returncode != 0 and "hello" not in r.stdout, r.stdout
    ok = _in_netns("iso-l2-a", *HTTP_GET, c)
    assert ok.returncode == 0 and "hello" in ok.stdout, ok  # same VLAN: bridged directly


def test_cell_cannot_reach_a_cell_on_another_vlan_through_the_host(
        three_cells: dict[str, str]) -> None:
    # Closed by the channel-3 firewall (agent/firewall.py): no manifest allows it.
    r = probe("iso-routed", f"""
def get(addr):
    s = socket.create_connection((addr, 8080), timeout=4)
    s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    return s.recv(100)
result({{"b": oserr(get, "{three_cells['b']}")}})
""", network={"vlan": 150})
    assert r["b"] != "ok", r


def test_cell_reaches_its_manifest_peer_by_name_through_a_read_only_etc_hosts(
        clean: dict[str, Any]) -> None:
    start("iso-hosts-web", HTTPD, uid=1000, network={"vlan": 143})
    web = ps()["iso-hosts-web"]["address"]
    r = probe("iso-hosts", """
import urllib.request
def fetch():
    return urllib.request.urlopen("http://iso-hosts-web:8080/", timeout=8).read().decode()
def create(path):
    open(path, 'a').close()
try:
    page = fetch()
except OSError as e:
    page = repr(e)
result({"hosts": open('/etc/hosts').read(), "page": page,
        "addr": socket.gethostbyname("iso-hosts-web"),
        "write": oserr(create, '/etc/hosts'),
        "umount": call(libc.umount2, b"/etc/hosts", 2)})
""", network={"vlan": "auto",
              "peers": [{"cell": "iso-hosts-web", "ports": [8080], "proto": "tcp"}]})
    assert r["addr"] == web, r
    assert "iso-hosts\n" in r["hosts"] and "127.0.0.1\tlocalhost" in r["hosts"], r
    assert "hello" in r["page"], r
    assert r["write"] in ("EROFS", "EACCES") and r["umount"] == "EPERM", r  # host-owned, ro


# -- what a cell's /proc hides, its host inodes, its capabilities (issue 10) --------------

def _asound() -> bool:
    """Load the sound core (the box has no card) so that /proc/asound exists: a masked
    directory the box's kernel really has (it lacks /proc/acpi and /proc/scsi)."""
    return sh("modprobe", "snd", check=False).returncode == 0 and Path("/proc/asound").is_dir()


def test_proc_paths_are_masked_and_read_only(clean: dict[str, Any]) -> None:
    assert _asound(), "modprobe snd: the image should carry the sound core (qemu/image.py)"
    paths = PROC_MASKED + PROC_READ_ONLY
    r = probe("iso-mask", f"""
import stat
def look(p):
    try:
        st = os.lstat(p)
    except OSError as e:
        return {{"missing": errno.errorcode[e.errno]}}
    if stat.S_ISDIR(st.st_mode):
        return {{"dir": sorted(os.listdir(p)), "dev": st.st_dev}}
    try:
        size = len(open(p, 'rb').read(4096))
    except OSError as e:
        size = errno.errorcode[e.errno]
    return {{"size": size, "chr": stat.S_ISCHR(st.st_mode), "rdev": [os.major(st.st_rdev),
            os.minor(st.st_rdev)]}}
def write(path):
    with open(path, 'w') as f:
        f.write('x')
mi = {{l.split()[4]: l.split()[5] for l in open('/proc/self/mountinfo')}}
result({{"look": {{p: look('/proc/' + p) for p in {list(paths)!r}}}, "mounts": mi,
        "proc_dev": os.stat('/proc/self').st_dev,
        "umount_kcore": call(libc.umount2, b"/proc/kcore", 2),
        "umount_asound": call(libc.umount2, b"/proc/asound", 2),
        "sysrq": oserr(write, '/proc/sysrq-trigger'),
        "sysctl": oserr(write, '/proc/sys/kernel/hostname'),
        "asound_create": oserr(write, '/proc/asound/x')}})
""")
    look, mounts = r["look"], r["mounts"]
    kinds = set()
    for p in PROC_MASKED:
        host = Path("/proc") / p
        if not host.exists():  # this kernel lacks it: the cell has none either
            assert look[p] == {"missing": "ENOENT"}, (p, look[p])
            continue
        assert "ro" in mounts[f"/proc/{p}"].split(","), (p, mounts.get(f"/proc/{p}"))
        if host.is_dir():  # an empty tmpfs, not the cell's procfs; on the host: entries
            kinds.add("dir")
            assert look[p]["dir"] == [] and look[p]["dev"] != r["proc_dev"], (p, look[p])
            assert os.listdir(host), p
        else:  # /dev/null; on the host: procfs, and what root may read there is not empty
            kinds.add("file")
            assert look[p] == {"size": 0, "chr": True, "rdev": [1, 3]}, (p, look[p])
            assert not stat.S_ISCHR(host.lstat().st_mode), p
    assert kinds == {"dir", "file"}, kinds
    assert Path("/proc/timer_list").read_bytes() and Path("/proc/interrupts").read_bytes()
    with open("/proc/kcore", "rb") as f:
        assert f.read(4) == b"\x7fELF"  # the control: host root reads the kernel's memory
    for p in PROC_READ_ONLY:
        if (Path("/proc") / p).exists():
            assert "ro" in mounts[f"/proc/{p}"].split(","), (p, mounts[f"/proc/{p}"])
    assert r["umount_kcore"] == r["umount_asound"] == "EPERM", r  # trapped, refused
    assert r["sysrq"] in ("EROFS", "EACCES") and r["sysctl"] in ("EROFS", "EACCES"), r
    assert r["asound_create"] in ("EROFS", "EACCES"), r


def test_cell_owns_no_host_inode(clean: dict[str, Any]) -> None:
    """Its stdout FIFO and the host's /dev nodes stay host root's (chmod refused); what it
    writes to its data dir (an image on the host's flash, mounted below its run dir)
    belongs to its own non-zero host uid, in both modes."""
    image = DATA / "iso-inode.img"
    with_data = True
    areas = '[[writable]]\nkind = "tmpfs"\npath = "/tmp"\nsize = "1M"\n'
    areas += '[[writable]]\nkind = "data"\npath = "/data"\nsize = "4M"\n'
    image.unlink(missing_ok=True)
    try:
        row, r = start_probe("iso-inode", f"""
import stat
def make(path, mode):
    with open(path, 'w') as f:
        f.write('x')
    os.chmod(path, mode)
r = {{"fchmod_stdout": oserr(os.fchmod, 1, 0o666),
     "chmod_stdout": oserr(os.chmod, '/proc/self/fd/1', 0o666),
     "chown_stdout": oserr(os.fchown, 1, os.getuid(), os.getgid()),
     "chmod_null": oserr(os.chmod, '/dev/null', 0o600),
     "utime_null": oserr(os.utime, '/dev/null', None),
     "write_null": oserr(lambda: open('/dev/null', 'w').write('x')),
     "stdout_mode": oct(stat.S_IMODE(os.fstat(1).st_mode)),
     "tmp": oserr(make, '/tmp/f', 0o4755),
     "data": oserr(make, '/data/f', 0o4755) if {with_data} else "ok"}}
result(r)
import time; time.sleep(100000)
""", extra=areas)
        assert r["fchmod_stdout"] == r["chmod_stdout"] == r["chown_stdout"] == "EPERM", r
        assert r["chmod_null"] == r["utime_null"] == "EROFS", r  # a read-only bind
        assert r["write_null"] == "ok" and r["stdout_mode"] == "0o600", r
        assert r["data"] == r["tmp"] == "ok", r  # the control: its own files, its own modes
        for stream in ("stdout", "stderr"):  # the FIFOs on the host: still agentd's
            st = (RUN_CELLS / "iso-inode" / stream).lstat()
            assert stat.S_ISFIFO(st.st_mode) and st.st_uid == 0, stream
            assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert stat.S_IMODE(Path("/dev/null").stat().st_mode) == 0o666
        host_uid = _host_ids(row["pid"])[0]
        assert host_uid != 0, host_uid
        if with_data:
            f = (RUN_CELLS / "iso-inode" / "data" / "f").stat()
            assert f.st_uid == host_uid and f.st_gid != 0, (f.st_uid, f.st_gid, host_uid)
            assert stat.S_IMODE(f.st_mode) == 0o4755  # set-uid to its own host uid only
    finally:
        sh("agentctl", "stop", "iso-inode", check=False, timeout=120)
        image.unlink(missing_ok=True)


NOT_WITHOUT_USERNS = sorted(c for c, m in CAPABILITY_MODES.items() if not m.keep_without_userns)
KEPT_WITHOUT_USERNS = sorted(c for c, m in CAPABILITY_MODES.items() if m.keep_without_userns)
# a packet socket: the capability counts for nothing (EPERM), or the filter's allow-list of
# socket families refuses AF_PACKET before the kernel looks at capabilities (EAFNOSUPPORT)
_NO_RAW = ("EPERM", "EAFNOSUPPORT")
CAPS_PROBE = """
status = {k: v.strip() for k, v in (l.split(':', 1) for l in open('/proc/self/status'))}
result({"eff": status["CapEff"], "bnd": status["CapBnd"],
        "sched_fifo": call(libc.sched_setscheduler, 0, 1, ctypes.byref(ctypes.c_int(1))),
        "raw": oserr(socket.socket, socket.AF_PACKET, socket.SOCK_RAW, 0)})
"""


def _caps(names: list[str]) -> list[str]:
    return [c.removeprefix("CAP_").lower() for c in names]


def _mask(names: list[str]) -> str:
    return f"{sum(1 << CAPABILITIES[c] for c in names):016x}"


def test_capabilities_a_cell_may_keep_depend_on_the_mode(clean: dict[str, Any]) -> None:
    """Without user namespaces a manifest asking for a capability that would act on the
    host (NET_RAW, SYS_NICE, ...) is refused with a code and a hint; with them it runs,
    and those capabilities count only inside the cell (no real-time class, no raw socket
    on the agent's netns).  The set kept in both modes is granted in both."""
    extra = f"[privileges]\ncapabilities = {_caps(NOT_WITHOUT_USERNS)!r}\n".replace("'", '"')
    if MODE["name"] == "nouserns":
        write_manifest("iso-caps", SLEEPER, uid=1000, extra=extra)
        try:
            err = refused("run", "iso-caps")
        finally:
            (SERVICES / "iso-caps.toml").unlink()
        assert "error[E_POLICY_USERNS]" in err, err
        for cap in NOT_WITHOUT_USERNS:
            assert f"{cap}: " in err, (cap, err)
        assert "may keep only: audit_write" in err and "iso-caps" not in ps(), err
    else:
        r = probe("iso-caps", CAPS_PROBE, uid=1000, extra=extra)
        assert r["eff"] == r["bnd"] == _mask(NOT_WITHOUT_USERNS), r
        assert r["sched_fifo"] == "EPERM" and r["raw"] in _NO_RAW, r  # granted, void
    kept = f"[privileges]\ncapabilities = {_caps(KEPT_WITHOUT_USERNS)!r}\n".replace("'", '"')
    r = probe("iso-caps-kept", CAPS_PROBE, uid=1000, extra=kept)
    assert r["eff"] == r["bnd"] == _mask(KEPT_WITHOUT_USERNS), r
    assert {CAPABILITIES[c] for c in KEPT_WITHOUT_USERNS} == NOUSERNS_KEEPABLE
    assert r["sched_fifo"] == "EPERM" and r["raw"] in _NO_RAW, r
