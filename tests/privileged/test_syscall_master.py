"""Channel 2 on the host kernel, with real cells (spawn_cell: user, mount, pid namespaces):
``mount_usb`` into a cell's own mount namespace, and the listener keeper that outlives
agentd (and its hand-over across exec).

The USB partition is a real ext4 file system on a real loop device; only its identity
as a USB disk comes from a sysfs tree made by the test (``sys_root``: a ``class/block``
link through a ``usb1`` port, as a USB stick's is), since the host has no USB disk to
spare.  The box has no USB controller either; its guest tests refuse a real non-USB
block device.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.core import seccomp as sc
from agent.core.sandbox import DEFAULT_MOUNTS, Mount, SpawnSpec, UidMap
from agent.kernel import libc as ksys
from agent.kernel import seccomp as notify
from agent.kernel.spawn import spawn_cell
from agent.monitor.syscall.adapter_keeper import KEEPER_UID, KeeperLink
from agent.monitor.syscall.service import SyscallService

BUSYBOX = shutil.which("busybox")
PROG = sc.pack(sc.compile_filter(sc.FilterSpec.for_cell(["mount_usb"])))


class Bus:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, channel: str, kind: str, *, cell: str | None = None,
             severity: str = "info", **attrs: Any) -> None:
        self.events.append({"channel": channel, "kind": kind, "cell": cell, **attrs})

    def kinds(self) -> list[str]:
        return [f"{e['channel']}/{e['kind']}" for e in self.events]


@pytest.fixture
def rootfs() -> Iterator[Path]:
    if BUSYBOX is None:
        pytest.fail("busybox is not installed: ./dev test installs it (busybox-static)")
    root = Path(tempfile.mkdtemp(prefix="agent-cell-"))
    root.chmod(0o755)
    for d in ("bin", "proc", "dev", "tmp", "media/usb", "media/other"):
        (root / d).mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    yield root
    shutil.rmtree(root)


@pytest.fixture
def usb_disk() -> Iterator[tuple[Path, Path, str]]:
    """(sys_root, dev_root, loop device) of an ext4 'USB stick' named sda1 and a
    non-USB disk named sdb1 (both on real loop devices)."""
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.fail("mkfs.ext4 and losetup are needed (e2fsprogs, mount)")
    work = Path(tempfile.mkdtemp(prefix="agent-usb-"))
    files = work / "files"
    files.mkdir()
    (files / "hello.txt").write_text("from the stick\n")
    img = work / "stick.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(files), str(img)], check=True)
    loops = []
    try:
        for _ in range(2):
            loops.append(subprocess.run(["losetup", "--find", "--show", str(img)],
                                        check=True, capture_output=True,
                                        text=True).stdout.strip())  # fmt: skip
        sys_root, dev_root = work / "sys", work / "dev"
        dev_root.mkdir()
        for name, loop, parent in (("sda1", loops[0], "platform/xhci/usb1/1-1/1-1:1.0/host0"),
                                   ("sdb1", loops[1], "platform/ahci/ata1/host1")):  # fmt: skip
            rdev = os.stat(loop).st_rdev
            dev = sys_root / "devices" / parent / "block" / name[:3] / name
            dev.mkdir(parents=True)
            (dev / "dev").write_text(f"{os.major(rdev)}:{os.minor(rdev)}\n")
            (sys_root / "class/block").mkdir(parents=True, exist_ok=True)
            (sys_root / "class/block" / name).symlink_to(dev)
            os.mknod(dev_root / name, 0o600 | stat.S_IFBLK, rdev)
        yield sys_root, dev_root, loops[0]
    finally:
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], check=False)
        shutil.rmtree(work)


def _cell(root: Path, script: str) -> tuple[Any, int]:
    r, w = os.pipe()
    spec = SpawnSpec(argv=("/bin/busybox", "sh", "-c", script), rootfs=str(root),
                     env=(("PATH", "/bin"),), stdout=w, stderr=w, userns=UidMap(300000, 65536),
                     mounts=(*DEFAULT_MOUNTS, Mount("tmpfs", "/tmp", size=1 << 20)),
                     seccomp=PROG)  # fmt: skip
    try:
        return spawn_cell(spec), r
    finally:
        os.close(w)


def _serve(cell: Any, svc: SyscallService, name: str = "usb") -> int:
    """Answer the cell's traps until its pid 1 ends; its exit status."""

    async def main() -> None:
        await svc.start()
        loop = asyncio.get_running_loop()
        svc.on_listener(name, cell.seccomp_fd, cell.pid)
        done = loop.create_future()
        loop.add_reader(cell.pidfd, lambda: done.done() or done.set_result(None))
        try:
            await asyncio.wait_for(done, 60)
        finally:
            loop.remove_reader(cell.pidfd)
            await svc.close()

    try:
        asyncio.run(main())
        return os.waitpid(cell.pid, 0)[1]
    finally:
        os.close(cell.pidfd)


MOUNT_SCRIPT = """
mount -t ext4 -o nosuid /dev/sda1 /media/usb; echo rc=$?
cat /media/usb/hello.txt
grep ' /media/usb ' /proc/self/mountinfo
echo owner=$(stat -c %u /media/usb/hello.txt)
mount -t ext4 /dev/sdb1 /media/other; echo sata=$?
mount -o bind /tmp /media/other; echo bind=$?
mount -t ext4 -o remount,rw,suid /dev/sda1 /media/usb; echo remount=$?
umount /proc; echo umount_proc=$?
umount /media/usb; echo umount=$?
ls /media/usb; echo listed
"""


def test_mount_usb_lands_in_the_cell_nosuid_nodev_noexec(
        rootfs: Path, usb_disk: tuple[Path, Path, str]) -> None:  # fmt: skip
    sys_root, dev_root, _loop = usb_disk
    before = Path("/proc/self/mountinfo").read_text()
    cell, r = _cell(rootfs, MOUNT_SCRIPT)
    bus = Bus()
    svc = SyscallService(bus, lambda c: frozenset({"mount_usb"}), reboot=lambda h: None,
                         sys_root=sys_root, dev_root=dev_root)  # fmt: skip
    status = _serve(cell, svc)
    with os.fdopen(r) as f:
        out = f.read()
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert "rc=0\n" in out and "from the stick\n" in out, out
    line = next(x for x in out.splitlines() if " /media/usb " in x)
    opts = line.split()[5].split(",")
    assert {"nosuid", "nodev", "noexec"} <= set(opts), line
    assert "owner=0\n" in out  # ext4 id-mapped into the cell: the disk's root is the cell's
    assert "sata=1\n" in out and "bind=1\n" in out and "remount=1\n" in out, out
    assert "umount_proc=1\n" in out and "umount=0\n" in out, out
    assert "hello.txt" not in out.split("umount=0")[1], out  # gone from the cell
    assert Path("/proc/self/mountinfo").read_text() == before  # never in the host's
    traps = [e for e in bus.events if e["kind"] == "trap"]
    got = [(e["syscall"], e["verdict"], e.get("error"), e.get("device")) for e in traps]
    assert got == [("mount", "allowed", None, "sda1"), ("mount", "denied", "EPERM", "sdb1"),
                   ("mount", "denied", "EPERM", None), ("mount", "denied", "EPERM", None),
                   ("umount2", "denied", "EPERM", None), ("umount2", "allowed", None, None)], got
    assert "not on a USB bus" in traps[1]["reason"]
    assert all(e["cell"] == "usb" and e["op"] == "mount_usb" for e in traps)


def test_mount_without_the_op_is_refused(rootfs: Path, usb_disk: tuple[Path, Path, str]
                                         ) -> None:  # fmt: skip
    sys_root, dev_root, _loop = usb_disk
    cell, r = _cell(rootfs, "mount -t ext4 /dev/sda1 /media/usb; echo rc=$?; ls /media/usb")
    bus = Bus()
    svc = SyscallService(bus, lambda c: frozenset({"set_time"}), reboot=lambda h: None,
                         sys_root=sys_root, dev_root=dev_root)  # fmt: skip
    _serve(cell, svc)
    with os.fdopen(r) as f:
        out = f.read()
    assert "rc=1" in out and "hello.txt" not in out, out
    (trap,) = [e for e in bus.events if e["kind"] == "trap"]
    assert (trap["verdict"], trap["error"], trap["reason"]) == ("denied", "EPERM",
                                                               "operation not granted")


# -- the keeper ---------------------------------------------------------------------------


def _trapping_child(script_w: int) -> tuple[int, int]:
    """A forked child under the cell filter whose sethostname waits for a master; its
    pid and listener fd."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            parent.close()
            ksys.set_no_new_privs()
            prog = sc.pack(sc.compile_filter(sc.FilterSpec()))
            lfd = notify.install_filter(prog, new_listener=True)
            assert lfd is not None
            socket.send_fds(child, [b"L"], [lfd])
            os.close(lfd)
            child.recv(1)  # go
            try:
                socket.sethostname("kept")
                res = "ok"
            except OSError as exc:
                res = errno.errorcode[exc.errno or 0]
            os.write(script_w, json.dumps(res).encode())
        finally:
            os._exit(0)
    child.close()
    _m, fds, _f, _a = socket.recv_fds(parent, 8, 1)
    parent.send(b"g")
    parent.close()
    return pid, fds[0]


def _proc_status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


def test_trapped_calls_survive_agentd_through_the_keeper() -> None:
    work = Path(tempfile.mkdtemp(prefix="agent-keeper-"))
    path = str(work / "listeners.sock")
    r, w = os.pipe()
    first = KeeperLink(path)
    keeper_pid = None
    try:
        assert first.open() is False  # none was running: started
        keeper_pid = first.proc.pid
        st = _proc_status(keeper_pid)
        assert st["Uid"].split()[:2] == [str(KEEPER_UID)] * 2 and st["CapEff"] == "0" * 16
        pid, lfd = _trapping_child(w)
        os.close(w)
        assert first.put("cell-a", pid, lfd)
        os.close(lfd)  # agentd is gone: only the keeper's copy is left
        first.close()
        assert not select.select([r], [], [], 1.0)[0]  # the call waits (no ENOSYS)
        # the next agentd
        bus = Bus()
        svc = SyscallService(bus, lambda c: frozenset(), reboot=lambda h: None,
                             keeper=KeeperLink(path))  # fmt: skip

        async def main() -> None:
            await svc.start()
            assert [c.cell for c in svc.cells.values()] == ["cell-a"]
            svc.on_listener("cell-a", None, pid)  # adoption finds it: no listener-lost
            loop = asyncio.get_running_loop()
            got = loop.create_future()
            loop.add_reader(r, lambda: got.done() or got.set_result(os.read(r, 64)))
            assert json.loads(await asyncio.wait_for(got, 30)) == "EPERM"
            loop.remove_reader(r)
            # the keeper dies: agentd starts another and hands everything over again
            os.kill(keeper_pid, signal.SIGKILL)
            for _ in range(100):
                if "master/keeper-lost" in bus.kinds() and svc.keeper is not None \
                        and svc.keeper.proc is not None:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.5)  # its backoff
            await svc.close()

        asyncio.run(main())
        os.waitpid(pid, 0)
        kinds = bus.kinds()
        assert "syscall/trap" in kinds and "master/listener-lost" not in kinds, kinds
        assert "master/keeper-lost" in kinds
        assert svc.keeper is not None and svc.keeper.proc is not None
        keeper_pid = svc.keeper.proc.pid  # the new one, cleaned up below
        assert keeper_pid != first.proc.pid
    finally:
        os.close(r)
        for p in {keeper_pid, first.proc.pid if first.proc else None} - {None}:
            assert p is not None
            with_kill(p)
        shutil.rmtree(work)


def with_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.02)


def test_listeners_pass_across_exec_by_cell() -> None:
    """(b): the fds a re-exec keeps, and their re-adoption by cell in the new master."""
    r, w = os.pipe()
    pid, lfd = _trapping_child(w)
    os.close(w)
    bus = Bus()

    async def main() -> None:
        old = SyscallService(bus, lambda c: frozenset(), reboot=lambda h: None)
        await old.start()
        old.on_listener("cell-b", lfd, pid)
        kept = old.kept_fds()
        assert kept == [("cell-b", pid, lfd)]
        passed = [(cell, p, os.dup(fd)) for cell, p, fd in kept]  # what exec carries over
        await old.close()  # the old master's copies go with it
        new = SyscallService(bus, lambda c: frozenset(), reboot=lambda h: None)
        await new.start()
        for cell, p, fd in passed:
            new.readopt(cell, p, fd)
        loop = asyncio.get_running_loop()
        got = loop.create_future()
        loop.add_reader(r, lambda: got.done() or got.set_result(os.read(r, 64)))
        assert json.loads(await asyncio.wait_for(got, 30)) == "EPERM"
        loop.remove_reader(r)
        await new.close()

    try:
        asyncio.run(main())
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert [e["cell"] for e in bus.events if e["kind"] == "trap"] == ["cell-b"]
