"""Cells' network namespaces, pinned under ``/run/netns`` and owned by the agent.

Inside a cell's netns no pyroute2 ``NetNS`` (which forks a helper process per use) is
used: a short-lived thread enters the netns (``unshare``/``setns`` of CLONE_NEWNET change
only the calling thread), opens a netlink socket there (a socket stays in the netns it
was made in) and ends; an ``IPRoute`` then runs over that socket from any thread
(docs/performance.md).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import netns

from agent.core import syscalls as abi
from agent.core.errors import KernelError
from agent.core.names import NETNS_PREFIX, check_cell_name
from agent.kernel import libc as ksys
from agent.kernel.netlink import LOOPBACK_INDEX, ipr_on, nl, rtnl_fd

__all__ = [
    "NETNS_DIR",
    "create_cell_netns",
    "destroy_cell_netns",
    "in_own_thread",
    "list_cell_netns",
    "netns_path",
    "open_netns",
]

NETNS_DIR = Path("/run/netns")
_T = TypeVar("_T")


def netns_path(cell: str, run_dir: Path = NETNS_DIR) -> Path:
    return run_dir / (NETNS_PREFIX + check_cell_name(cell))


def in_own_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` in a thread of its own and return its result (or raise its error).

    The thread may change its network namespace: it ends with ``fn``, so no other
    code ever runs in the namespace it was left in."""
    out: list[_T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            err.append(exc)

    t = threading.Thread(target=run, name="agent-netns", daemon=True)
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


def _share_dir(run_dir: Path) -> None:
    """``run_dir`` becomes a shared mount point, so pins made in it show in every mount
    namespace that has it (what ``ip netns add`` and pyroute2 do)."""
    run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        ksys.mount(None, str(run_dir), None, abi.MS_SHARED | abi.MS_REC)
    except KernelError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: not a mount point yet
            raise
        ksys.mount(str(run_dir), str(run_dir), None, abi.MS_BIND | abi.MS_REC)
        ksys.mount(None, str(run_dir), None, abi.MS_SHARED | abi.MS_REC)


def _fd_in_thread(fn: Callable[[], int], op: str, path: Path) -> int:
    """:func:`in_own_thread` for a step that enters a netns and returns a socket: its
    failure is a KernelError naming ``op`` (and the call that failed) and ``path``."""
    try:
        return in_own_thread(fn)
    except KernelError as exc:
        raise KernelError(f"{op} ({exc.op})", str(path), exc.errno) from exc
    except OSError as exc:
        raise KernelError.from_oserror(op, str(path), exc) from exc


def enter_netns(netns_file: Path) -> None:
    """Move the calling thread into the netns pinned at ``netns_file`` (only a thread
    that ends afterwards: :func:`in_netns`)."""
    nsfd = os.open(netns_file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ksys.setns(nsfd, abi.CLONE_NEWNET, str(netns_file))
    finally:
        os.close(nsfd)


def in_netns(netns_file: Path, fn: Callable[[], _T]) -> _T:
    """``fn()`` in a thread of its own that has entered the netns at ``netns_file`` (a
    socket it makes stays in that netns)."""

    def enter() -> _T:
        enter_netns(netns_file)
        return fn()

    return in_own_thread(enter)


def open_netns(netns_file: Path) -> Any:
    """An ``IPRoute`` whose socket lives in the netns pinned at ``netns_file`` (no helper
    process, unlike pyroute2's ``NetNS``).  The caller closes it."""

    def enter() -> int:
        enter_netns(netns_file)
        return rtnl_fd()

    return ipr_on(_fd_in_thread(enter, "netns open", netns_file))


def create_cell_netns(cell: str, run_dir: Path = NETNS_DIR) -> Path:
    """Create the cell's network namespace, pinned at ``run_dir/cell-<name>``
    (what ``ip netns add`` does), with lo up.  The agent, not the cell, owns it.

    A thread unshares its netns, bind-mounts it on the pin and opens the netlink
    socket that then sets lo up: no process is forked."""
    path = netns_path(cell, run_dir)

    def make() -> int:
        _share_dir(run_dir)
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
        try:
            ksys.unshare(abi.CLONE_NEWNET)
            ksys.mount("/proc/thread-self/ns/net", str(path), None, abi.MS_BIND)
        except BaseException:
            os.unlink(path)
            raise
        return rtnl_fd()

    fd = _fd_in_thread(make, "netns create", path)
    try:
        _lo_up(fd, path)
    except BaseException:
        destroy_cell_netns(cell, run_dir)
        raise
    return path


def _lo_up(fd: int, netns_file: Path) -> None:
    """Loopback up: a cell without a [network] link still has a working 127.0.0.1."""
    where = f"netns {netns_file}"
    with nl("netns open", where):
        ns = ipr_on(fd)
    try:
        with nl("link set", f"lo up in {where}"):
            ns.link("set", index=LOOPBACK_INDEX, state="up")
    finally:
        ns.close()


def destroy_cell_netns(cell: str, run_dir: Path = NETNS_DIR) -> None:
    """Unmount and remove the pin; the namespace dies with its last user.
    Missing is fine."""
    path = netns_path(cell, run_dir)
    if not path.exists():
        return
    with nl("netns remove", str(path), ignore={errno.ENOENT}):
        netns.remove(str(path))


def list_cell_netns(run_dir: Path = NETNS_DIR) -> list[str]:
    """Cell names with a pinned netns under ``run_dir``."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    return sorted(n[len(NETNS_PREFIX):] for n in names if n.startswith(NETNS_PREFIX))
