"""spawn_cell on the host kernel: real namespaces, mounts, caps, cgroup v1, netns.

Each cell runs a static busybox from a root built in tmp_path and reports what
it sees on a pipe.  Needs root and busybox-static (apt-get install busybox-static).
Without a user namespace a cell runs as host uid/gid 1000 (``NOUSERNS``): the
sandbox refuses host root there.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.core import seccomp as sc
from agent.core.errors import ConfigError, KernelError
from agent.core.grants import NOUSERNS_KEEPABLE
from agent.core.sandbox import (
    DEFAULT_MOUNTS,
    PROC_MASKED,
    PROC_READ_ONLY,
    Mount,
    SpawnSpec,
    UidMap,
)
from agent.core.syscalls import CAPS
from agent.kernel import seccomp as notify
from agent.kernel.spawn import spawn_cell

BUSYBOX = shutil.which("busybox")
NOUSERNS = {"uid": 1000, "gid": 1000}  # the ids of a cell without a user namespace
USERNS = UidMap(300000, 65536)


@pytest.fixture(autouse=True)
def _busybox() -> None:
    # A tool ./dev test installs: missing, it fails (a skip would hide the spawn tests).
    if BUSYBOX is None:
        pytest.fail("busybox is not installed: ./dev test installs it (busybox-static)")


def _mountinfo() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(" ".join(line.split()[3:5]) for line in f)


def _no_children() -> bool:
    """No cell process (a child of ours whose root is not ours) is left.  Not
    ``waitpid(-1)``: it would reap, and count, any other test's child (a keeper, a
    daemon) that happens to end at that moment."""
    for task in Path("/proc/self/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                if os.readlink(f"/proc/{child}/root") != "/":
                    return False
            except OSError:
                continue  # gone meanwhile, or a zombie: not a running cell
    return True


@pytest.fixture
def rootfs() -> Iterator[Path]:
    # not under tmp_path: pytest's 0700 directories are closed to a mapped uid
    root = Path(tempfile.mkdtemp(prefix="agent-cell-"))
    root.chmod(0o755)
    for d in ("bin", "proc", "dev", "tmp", "etc", "data"):
        (root / d).mkdir(parents=True)
    assert BUSYBOX is not None
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    before = _mountinfo()
    yield root
    shutil.rmtree(root)
    assert _no_children(), "a cell process was left behind"
    assert _mountinfo() == before, "a mount leaked into the host namespace"


def run_cell(root: Path, script: str, **kw: Any) -> tuple[int, str]:
    """Spawn ``sh -c script``, refuse every trapped syscall, return (status, output)."""
    r, w = os.pipe()
    kw.setdefault("mounts", (*DEFAULT_MOUNTS, Mount("tmpfs", "/tmp", size=1 << 20)))
    if kw.get("userns") is None:
        for k, v in NOUSERNS.items():
            kw.setdefault(k, v)
    spec = SpawnSpec(argv=("/bin/busybox", "sh", "-c", script), rootfs=str(root),
                     env=(("PATH", "/bin"),), stdout=w, stderr=w, **kw)  # fmt: skip
    try:
        cell = spawn_cell(spec)
    finally:
        os.close(w)
    try:
        watch = [cell.pidfd] + ([cell.seccomp_fd] if cell.seccomp_fd is not None else [])
        while cell.pidfd not in select.select(watch, [], [], 20)[0]:
            assert cell.seccomp_fd is not None, "cell hung"
            n = notify.recv_notif(cell.seccomp_fd)
            if n is not None:
                notify.send_resp(cell.seccomp_fd, n.id, error=errno.EPERM)
        _, status = os.waitpid(cell.pid, 0)
        with os.fdopen(r, "rb") as f:
            out = f.read().decode()
    finally:
        os.close(cell.pidfd)
        if cell.seccomp_fd is not None:
            os.close(cell.seccomp_fd)
    return os.waitstatus_to_exitcode(status), out


def _status(out: str, key: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                if line.startswith(key + ":"))  # fmt: skip


PROBE = """
echo pid=$$
echo host=$(hostname)
grep -E '^(CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
echo procs=$(cd /proc && echo [0-9]*)
touch /newfile 2>&1
echo id=$(id -u):$(id -g)
cat /proc/self/uid_map
"""


@pytest.mark.parametrize("userns", [None, USERNS], ids=["nouserns", "userns"])
def test_cell_sees_its_own_world(rootfs: Path, userns: UidMap | None) -> None:
    prog = sc.pack(sc.compile_filter(sc.FilterSpec()))
    code, out = run_cell(rootfs, PROBE + f"ls /proc/{os.getpid()} 2>&1", hostname="cell-a",
                         userns=userns, caps_keep=frozenset({"CAP_NET_BIND_SERVICE"}),
                         seccomp=prog)  # fmt: skip
    assert code != 0 or "No such file" in out  # last command: our pid is not visible
    assert "pid=1\n" in out
    assert "host=cell-a\n" in out
    assert _status(out, "CapEff") == f"{1 << 10:016x}"
    assert _status(out, "CapBnd") == f"{1 << 10:016x}"
    assert _status(out, "NoNewPrivs") == "1"
    assert _status(out, "Seccomp") == "2"
    pids = [int(p) for p in out.split("procs=", 1)[1].split("\n", 1)[0].split()]
    assert 1 in pids and max(pids) < 10  # only the cell's few processes, none of the host's
    assert "Read-only file system" in out
    ids = "id=1000:1000\n" if userns is None else "id=0:0\n"
    assert ids in out
    mapping = out.split(ids, 1)[1].split()[:3]
    if userns is None:
        assert mapping == ["0", "0", "4294967295"]  # the host's ids: a non-zero host uid
    else:
        assert mapping == ["0", "300000", "65536"]


def test_non_root_uid_keeps_granted_caps_through_exec(rootfs: Path) -> None:
    code, out = run_cell(rootfs, PROBE, userns=UidMap(300000, 65536), uid=1000, gid=1000,
                         caps_keep=frozenset({"net_raw"}))  # fmt: skip
    assert code == 0, out
    assert "id=1000:1000\n" in out
    assert _status(out, "CapEff") == f"{1 << 13:016x}"
    assert _status(out, "CapAmb") == f"{1 << 13:016x}"


def test_tmpfs_noexec_unless_asked(rootfs: Path) -> None:
    script = "cp /bin/busybox /tmp/busybox && /tmp/busybox true && echo EXEC-OK"
    script += "; grep ' /tmp ' /proc/mounts"
    _, out = run_cell(rootfs, script)
    assert "EXEC-OK" not in out and "noexec" in out and "nosuid" in out and "nodev" in out
    exec_tmp = Mount("tmpfs", "/tmp", size=8 << 20, flags=frozenset({"nosuid", "nodev"}))
    _, out = run_cell(rootfs, script, mounts=(*DEFAULT_MOUNTS, exec_tmp))
    assert "EXEC-OK" in out


def test_bind_mount_read_only_and_rlimits(rootfs: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("from-host")
    ro = Mount("bind", "/data", source=str(data), flags=frozenset({"ro", "noexec"}))
    _, out = run_cell(rootfs, "cat /data/f; echo; echo x > /data/g; ulimit -n",
                         mounts=(*DEFAULT_MOUNTS, ro), rlimits=(("nofile", 64, 64),))
    assert "from-host" in out and "Read-only file system" in out
    assert out.strip().endswith("64")
    assert not (data / "g").exists()


def test_netns_is_joined_and_not_writable_by_cell_root(rootfs: Path) -> None:
    if shutil.which("ip") is None:
        pytest.fail("ip is not installed: ./dev test installs it (iproute2)")
    name = f"agent-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "mtu", "1234"], check=True)
        script = "ip link show lo; ip link set lo up; echo rc=$?"
        _, out = run_cell(rootfs, script, netns_path=f"/run/netns/{name}",
                          userns=UidMap(300000, 65536), caps_keep=frozenset({"net_admin"}))
        assert "mtu 1234" in out  # the agent's netns, not a fresh one
        # CAP_NET_ADMIN in the cell's user namespace does not own the agent's netns
        assert "Operation not permitted" in out and "rc=0" not in out
        _, out = run_cell(rootfs, script, userns=UidMap(300000, 65536),
                          caps_keep=frozenset({"net_admin"}))
        assert "mtu 1234" not in out and "rc=0" in out  # no netns_path: a fresh one, its own
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_cell_joins_its_cgroup(rootfs: Path) -> None:
    base = Path("/sys/fs/cgroup/pids")
    if not (base / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids hierarchy")
    cg = base / f"agent-test-{os.getpid()}"
    cg.mkdir()
    try:
        r, w = os.pipe()
        spec = SpawnSpec(argv=("/bin/busybox", "sh", "-c", "cat /proc/self/cgroup; sleep 30"),
                         rootfs=str(rootfs), cgroup_path=str(cg), stdout=w, **NOUSERNS)  # fmt: skip
        cell = spawn_cell(spec)
        os.close(w)
        try:
            assert str(cell.pid) in (cg / "cgroup.procs").read_text().split()
            seen = os.read(r, 4096).decode()
            assert "pids:/\n" in seen  # the cgroup namespace is rooted at the leaf
        finally:
            signal.pidfd_send_signal(cell.pidfd, signal.SIGKILL)
            os.waitpid(cell.pid, 0)
            os.close(cell.pidfd)
            os.close(r)
    finally:
        cg.rmdir()


def test_missing_command_names_execve(rootfs: Path) -> None:
    spec = SpawnSpec(argv=("nosuchcmd",), rootfs=str(rootfs), env=(("PATH", "/bin"),),
                     **NOUSERNS)
    with pytest.raises(KernelError) as exc:
        spawn_cell(spec)
    assert exc.value.op == "execve" and exc.value.errno == errno.ENOENT


def test_missing_mount_point_names_the_step(rootfs: Path) -> None:
    (rootfs / "proc").rmdir()
    spec = SpawnSpec(argv=("/bin/busybox", "true"), rootfs=str(rootfs), **NOUSERNS)
    with pytest.raises(KernelError) as exc:
        spawn_cell(spec)
    assert exc.value.op == "mount(proc)" and exc.value.target.endswith("/proc")
    assert exc.value.errno == errno.ENOENT and exc.value.hint


def test_symlinked_mount_point_is_refused(rootfs: Path, tmp_path: Path) -> None:
    (rootfs / "tmp").rmdir()
    (rootfs / "tmp").symlink_to(tmp_path)
    with pytest.raises(KernelError) as exc:
        run_cell(rootfs, "true")
    assert exc.value.op == "resolve" and exc.value.errno == errno.ELOOP


def test_nonexistent_rootfs(tmp_path: Path) -> None:
    spec = SpawnSpec(argv=("/bin/true",), rootfs=str(tmp_path / "nope"), **NOUSERNS)
    with pytest.raises(KernelError) as exc:
        spawn_cell(spec)
    assert exc.value.op == "stat"
    assert _no_children()


@pytest.mark.parametrize("kw", [
    {"uid": 0, "gid": 1000}, {"uid": 1000, "gid": 0},
    {**NOUSERNS, "caps_keep": frozenset({"net_raw"})},
    {**NOUSERNS, "caps_keep": frozenset({"kill", "dac_override"})},
    {**NOUSERNS, "no_new_privs": False},
], ids=["uid0", "gid0", "net_raw", "dac_override", "new_privs"])
def test_without_userns_host_root_and_host_caps_are_refused(rootfs: Path,
                                                            kw: dict[str, Any]) -> None:
    spec = SpawnSpec(argv=("/bin/busybox", "true"), rootfs=str(rootfs), **kw)
    with pytest.raises(ConfigError) as exc:
        spawn_cell(spec)
    assert exc.value.code == "E_SPAWN" and exc.value.hint, exc.value
    assert _no_children()  # refused before anything was forked
    # The control: the same ids and capabilities inside a user namespace are the cell's own.
    code, _ = run_cell(rootfs, "true", **{**kw, "userns": USERNS})
    assert code == 0


def test_without_userns_the_allowed_capabilities_are_kept(rootfs: Path) -> None:
    caps = {name: n for name, n in CAPS.items() if n in NOUSERNS_KEEPABLE}
    assert "net_bind_service" in caps and "net_raw" not in caps and "setuid" not in caps
    code, out = run_cell(rootfs, PROBE, caps_keep=frozenset(caps))
    assert code == 0, out
    mask = f"{sum(1 << n for n in caps.values()):016x}"
    assert _status(out, "CapEff") == _status(out, "CapAmb") == mask
    assert "id=1000:1000\n" in out


def test_net_raw_in_a_user_namespace_has_no_effect_on_the_agents_netns(rootfs: Path) -> None:
    # docs/isolation.md: CAP_NET_RAW counts in a netns owned by the cell's user namespace
    # only; the agent makes the cell's netns in the host's, so there it reaches nothing.
    name = f"agent-test-raw-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        script = "arping -c 1 -w 1 -I lo 127.0.0.1 2>&1"
        caps = frozenset({"net_raw"})
        _, out = run_cell(rootfs, script, netns_path=f"/run/netns/{name}", userns=USERNS,
                          caps_keep=caps)
        assert "Operation not permitted" in out, out
        _, out = run_cell(rootfs, script, userns=USERNS, caps_keep=caps)  # its own netns
        # past socket(AF_PACKET) to the interface checks
        assert "Operation not permitted" not in out and "interface lo is" in out, out
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def _mountinfo_of(out: str) -> dict[str, tuple[str, str, str]]:
    """mount point -> (root, options, fs type) from a mountinfo text in ``out``."""
    points = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) > 8 and "-" in f[6:] and f[4].startswith("/"):
            points[f[4]] = (f[3], f[5], f[f.index("-", 6) + 1])
    return points


MASK_PROBE = """
for p in {paths}; do
  if [ -d /proc/$p ]; then echo "dir $p $(ls -A /proc/$p | wc -l)"
  elif [ -e /proc/$p ]; then
    echo "file $p $(cat /proc/$p 2>/dev/null | wc -c) $(stat -c %t:%T /proc/$p)"
  else echo "none $p"; fi
done
chmod 600 /dev/null 2>&1; echo chmod_null=$?
echo x > /dev/null; echo write_null=$?
cat /proc/self/mountinfo
"""


@pytest.mark.parametrize("userns", [None, USERNS], ids=["nouserns", "userns"])
def test_proc_paths_are_masked_and_read_only_in_both_modes(rootfs: Path,
                                                           userns: UidMap | None) -> None:
    paths = PROC_MASKED + PROC_READ_ONLY
    code, out = run_cell(rootfs, MASK_PROBE.format(paths=" ".join(paths)), userns=userns)
    assert code == 0, out
    seen = {f[1]: f for f in (line.split() for line in out.splitlines()) if len(f) >= 2
            and f[0] in ("dir", "file", "none") and f[1] in paths}  # fmt: skip
    mounts = _mountinfo_of(out)
    kinds = set()
    for p in PROC_MASKED:
        host = Path("/proc") / p
        if not host.exists():  # this kernel lacks it: skipped, and the cell has none either
            assert seen[p][0] == "none", seen[p]
            continue
        root, opts, fstype = mounts[f"/proc/{p}"]
        assert "ro" in opts.split(","), (p, opts)
        if host.is_dir():
            kinds.add("dir")
            assert seen[p][:3] == ["dir", p, "0"] and fstype == "tmpfs", (seen[p], fstype)
        else:
            kinds.add("file")
            assert seen[p][:4] == ["file", p, "0", "1:3"] and root == "/null", (seen[p], root)
        # the control: on the host it is procfs, with what the cell no longer sees
        assert host.stat().st_dev == Path("/proc/self").stat().st_dev
    assert kinds == {"dir", "file"}, f"this host has no masked {kinds ^ {'dir', 'file'}}"
    assert Path("/proc/interrupts").read_bytes() and Path("/proc/timer_list").read_bytes()
    for p in PROC_READ_ONLY:
        if (Path("/proc") / p).exists():
            assert "ro" in mounts[f"/proc/{p}"][1].split(","), (p, mounts[f"/proc/{p}"])
    # /dev/null is the host's inode, bound read-only: usable, but its mode stays the host's
    assert "Read-only file system" in out and "chmod_null=1" in out and "write_null=0" in out
    assert stat.S_IMODE(os.stat("/dev/null").st_mode) == 0o666
