"""The compiled filter on the real kernel: verdicts, user notification, asyncio.

Part of it runs in plain forked children (the filter alone), part in cells made
by spawn_cell (the listener fd handed back over SCM_RIGHTS).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import select
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core import seccomp as sc
from agent.core import syscalls as abi
from agent.core.sandbox import DEFAULT_MOUNTS, SpawnSpec, UidMap
from agent.kernel import libc as ksys
from agent.kernel import seccomp as notify
from agent.kernel.spawn import spawn_cell

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _raw(name: str, *args: int) -> int:
    """errno of a raw syscall (0 on success)."""
    nr = abi.syscall_nr(name)
    assert nr is not None
    ret = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return ctypes.get_errno() if ret < 0 else 0


def _in_filtered_child(names: list[tuple[str, tuple[int, ...]]]) -> dict[str, int]:
    """Fork, install the default filter (no listener), run raw syscalls, report errnos."""
    prog = sc.pack(sc.compile_filter(sc.FilterSpec()))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            ksys.set_no_new_privs()
            notify.install_filter(prog, new_listener=False)
            out = ",".join(f"{n}={_raw(n, *a)}" for n, a in names)
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}


def test_deny_enosys_and_namespace_flags_on_the_real_kernel() -> None:
    got = _in_filtered_child([
        ("keyctl", (0, 0, 0)), ("bpf", (0, 0, 0)), ("userfaultfd", (0,)),
        ("clone3", (0, 0)), ("fsopen", (0, 0)),
        ("unshare", (0x400,)),  # CLONE_FILES only: allowed
        ("setns", (-1, 0)), ("getpid", ()),
    ])  # fmt: skip
    assert got["keyctl"] == got["bpf"] == got["userfaultfd"] == errno.EPERM
    assert got["clone3"] == got["fsopen"] == errno.ENOSYS
    assert got["setns"] == errno.EPERM
    assert got["getpid"] == 0
    assert got["unshare"] == 0  # harmless flags reach the kernel and succeed


def test_unshare_with_namespace_flag_is_refused() -> None:
    got = _in_filtered_child([("unshare", (abi.CLONE_NEWNS,))])
    assert got["unshare"] == errno.EPERM  # root could, the filter says no


@pytest.fixture
def rootfs() -> Iterator[Path]:
    bb = shutil.which("busybox")
    if bb is None:
        pytest.fail("busybox is not installed: ./dev test installs it (busybox-static)")
    root = Path(tempfile.mkdtemp(prefix="agent-cell-"))
    root.chmod(0o755)
    for d in ("bin", "proc", "dev", "tmp"):
        (root / d).mkdir()
    shutil.copy(bb, root / "bin" / "busybox")
    yield root
    shutil.rmtree(root)


def _spawn(root: Path, script: str, w: int, **kw: object) -> tuple[int, int, int]:
    spec = SpawnSpec(argv=("/bin/busybox", "sh", "-c", script), rootfs=str(root), stdout=w,
                     stderr=w, env=(("PATH", "/bin"),), mounts=DEFAULT_MOUNTS,
                     seccomp=sc.pack(sc.compile_filter(sc.FilterSpec())), **kw)  # type: ignore[arg-type]
    cell = spawn_cell(spec)
    assert cell.seccomp_fd is not None
    assert not os.get_blocking(cell.seccomp_fd)
    return cell.pid, cell.pidfd, cell.seccomp_fd


def test_trapped_syscalls_reach_the_master_via_asyncio(rootfs: Path) -> None:
    r, w = os.pipe()
    script = ("busybox mount -t tmpfs none /tmp; echo mount=$?; "
              "busybox hostname denied; busybox hostname allowed; hostname")  # fmt: skip
    # CONTINUE runs the call with the cell's own privileges: CAP_SYS_ADMIN of its userns
    pid, pidfd, lfd = _spawn(rootfs, script, w, userns=UidMap(300000, 65536),
                             caps_keep=frozenset({"sys_admin"}))
    os.close(w)
    seen: list[tuple[str, int]] = []
    nspids: list[list[str]] = []

    async def master() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_notif() -> None:
            n = notify.recv_notif(lfd)
            if n is None:
                if notify.listener_dead(lfd):
                    loop.remove_reader(lfd)
                return
            # n.pid is in the reader's (host) pid namespace: a process of the cell
            with open(f"/proc/{n.pid}/status") as f:
                nspids.append(next(ln.split()[1:] for ln in f if ln.startswith("NSpid:")))
            seen.append((n.syscall(), n.args[1]))
            # Let the second sethostname run as the cell would have (its own UTS ns).
            allow = n.syscall() == "sethostname" and n.args[1] == len("allowed")
            notify.send_resp(lfd, n.id, cont=allow, error=0 if allow else errno.EPERM)

        loop.add_reader(lfd, on_notif)
        def on_exit() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(pidfd, on_exit)
        await asyncio.wait_for(done, 20)
        loop.remove_reader(pidfd)
        loop.remove_reader(lfd)

    try:
        asyncio.run(master())
        os.waitpid(pid, 0)
        with os.fdopen(r) as f:
            out = f.read()
    finally:
        os.close(pidfd)
        os.close(lfd)
    assert [name for name, _ in seen] == ["mount", "sethostname", "sethostname"]
    assert all(len(ns) == 2 and ns[0] != ns[1] for ns in nspids), nspids
    assert "mount=0" not in out and "permission denied" in out.lower()
    assert "Operation not permitted" in out  # the first hostname
    assert out.strip().endswith("allowed")


def test_dead_process_is_a_verdict_not_an_error(rootfs: Path) -> None:
    r, w = os.pipe()
    # no user namespace: a non-zero host uid (the sandbox refuses host root there)
    pid, pidfd, lfd = _spawn(rootfs, "busybox mount -t tmpfs none /tmp", w, uid=1000, gid=1000)
    os.close(w)
    os.close(r)
    try:
        assert select.select([lfd], [], [], 20)[0]
        n = notify.recv_notif(lfd)
        assert n is not None and n.syscall() == "mount"
        assert notify.id_valid(lfd, n.id)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert not notify.id_valid(lfd, n.id)
        assert notify.send_resp(lfd, n.id, error=errno.EPERM) is notify.Verdict.GONE
        assert notify.listener_dead(lfd)
    finally:
        os.close(pidfd)
        os.close(lfd)


def test_listener_fd_is_passed_back_only_with_a_filter(rootfs: Path) -> None:
    spec = SpawnSpec(argv=("/bin/busybox", "true"), rootfs=str(rootfs), uid=1000, gid=1000)
    cell = spawn_cell(spec)
    try:
        assert cell.seccomp_fd is None
        os.waitpid(cell.pid, 0)
    finally:
        os.close(cell.pidfd)
