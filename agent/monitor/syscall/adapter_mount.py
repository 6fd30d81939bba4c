"""The ``mount_usb`` operation on the host: a USB partition mounted nosuid, nodev,
noexec into a cell's own mount namespace, and taken out again.

The master never follows a path through the cell's symlinks from the host: the target
is resolved with ``openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`` from a handle on
the trapped process's root (opened before the notification id was re-checked), so
``..`` and absolute symlinks stay inside the cell.  The file system is made in the
host's mount namespace (``fsopen``/``fsconfig``/``fsmount``: the device path is the
host's), and attached with ``move_mount`` from a fresh thread that has left the
process's shared filesystem state (``unshare(CLONE_FS)``) and joined the cell's mount
namespace (``setns``): ``move_mount`` only attaches into the caller's namespace.  The
thread then ends, with the namespace it joined.  Roots (``/sys``, ``/dev``, ``/proc``)
are parameters.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from agent.core import syscalls as abi
from agent.core.errors import KernelError
from agent.kernel import libc as klibc
from agent.monitor.syscall.ops import MountUsb, Refused, Umount

__all__ = ["Refused", "attach_usb", "detach", "mnt_id", "resolve_in_root", "usb_node"]

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_FSOPEN_CLOEXEC, _FSMOUNT_CLOEXEC = 1, 1
_FSCONFIG_SET_FLAG, _FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 0, 1, 6
_MOVE_MOUNT_F_EMPTY_PATH, _MOVE_MOUNT_T_EMPTY_PATH = 0x4, 0x40
_AT_EMPTY_PATH = 0x1000
_MOUNT_ATTR_IDMAP = 0x100000
_RESOLVE_NO_MAGICLINKS, _RESOLVE_IN_ROOT = 0x2, 0x10
_CLONE_FS = 0x200
_USB_PORT = re.compile(r"usb\d+")


def _sys(name: str, what: str, *args: int | bytes | None) -> int:
    nr = abi.syscall_nr(name)
    if nr is None:
        raise KernelError(name, what, errno.ENOSYS)
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ret = int(_libc.syscall(ctypes.c_long(nr), *cargs))
    if ret < 0:
        raise KernelError(name, what, ctypes.get_errno())
    return ret


def usb_node(name: str, sys_root: Path = Path("/sys"), dev_root: Path = Path("/dev")) -> Path:
    """The host's device node of block device ``name`` (``sda1``), if the device sits on
    a USB bus (its sysfs path runs through a ``usbN`` port) and the node is that device."""
    link = sys_root / "class" / "block" / name
    if not link.exists():
        raise Refused(errno.ENODEV, f"no block device {name}")
    parents = os.path.realpath(link).split("/block/")[0]
    if not any(_USB_PORT.fullmatch(part) for part in parents.split("/")):
        raise Refused(errno.EPERM, f"{name} is not on a USB bus")
    major, minor = (int(x) for x in (link / "dev").read_text().strip().split(":"))
    node = dev_root / name
    try:
        st = os.stat(node)
    except FileNotFoundError:
        raise Refused(errno.ENODEV, f"no device node {node}") from None
    if not stat.S_ISBLK(st.st_mode) or st.st_rdev != os.makedev(major, minor):
        raise Refused(errno.ENODEV, f"{node} is not block device {major}:{minor}")
    return node


def resolve_in_root(root_fd: int, path: str) -> int:
    """An O_PATH fd of directory ``path`` resolved inside the root ``root_fd``."""
    how = struct.pack("=QQQ", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0,
                      _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)  # fmt: skip
    try:
        return _sys("openat2", path, root_fd, os.fsencode(path), how, len(how))
    except KernelError as exc:
        raise Refused(exc.errno or errno.ENOENT, f"target {path}: {os.strerror(exc.errno or 2)}"
                      ) from None


def mnt_id(fd: int) -> int:
    """The id of the mount ``fd`` is on (``mnt_id`` in /proc/self/fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise KernelError("fdinfo", f"fd {fd}", errno.ENOENT, "no mnt_id (kernel older than 3.15?)")


def _fresh_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new thread and wait: a namespace it joins ends with it."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["ok"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["err"] = exc

    t = threading.Thread(target=run, name="agent-mntns", daemon=True)
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]  # type: ignore[misc]
    return box["ok"]  # type: ignore[return-value]


def _in_cell_ns(mntns_fd: int, fn: Callable[[], T]) -> T:
    def run() -> T:
        klibc.unshare(_CLONE_FS)  # setns(CLONE_NEWNS) needs an fs_struct of our own
        klibc.setns(mntns_fd, abi.CLONE_NEWNS, "the cell's mount namespace")
        return fn()

    return _fresh_thread(run)


def _config(fs: int, key: str, value: str | None) -> None:
    cmd = _FSCONFIG_SET_FLAG if value is None else _FSCONFIG_SET_STRING
    _sys("fsconfig", key, fs, cmd, key.encode(), None if value is None else value.encode(), 0)


def _fs_messages(fs: int) -> str:
    out = []
    for _ in range(8):
        try:
            out.append(os.read(fs, 256).decode(errors="replace").strip())
        except OSError:
            break
    return "; ".join(out)


def attach_usb(op: MountUsb, node: Path, root_fd: int, mntns_fd: int, userns_fd: int,
               ids: tuple[int, int]) -> int:  # fmt: skip
    """Mount ``node`` as ``op`` says onto ``op.target`` in the cell; the new mount's id.
    ``ids``: the host uid and gid that own the files of a FAT-like file system (ext4 is
    id-mapped into the cell's user namespace ``userns_fd`` instead)."""
    target = resolve_in_root(root_fd, op.target)
    fs = mfd = -1
    try:
        try:
            fs = _sys("fsopen", op.fstype, op.fstype.encode(), _FSOPEN_CLOEXEC)
            _config(fs, "source", str(node))
            for flag in op.sb_flags:
                _config(fs, flag, None)
            for key, value in op.options:
                _config(fs, key, value)
            if op.fstype != "ext4":
                _config(fs, "uid", str(ids[0]))
                _config(fs, "gid", str(ids[1]))
            _sys("fsconfig", "create", fs, _FSCONFIG_CMD_CREATE, None, None, 0)
        except KernelError as exc:
            msg = _fs_messages(fs) if fs >= 0 else ""
            raise Refused(exc.errno or errno.EINVAL, f"{op.fstype} on {node}: "
                          f"{os.strerror(exc.errno or errno.EINVAL)} {msg}".strip()) from None
        mfd = _sys("fsmount", str(node), fs, _FSMOUNT_CLOEXEC, op.attrs)
        if op.fstype == "ext4":
            attr = struct.pack("=QQQQ", _MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
            _sys("mount_setattr", "idmap", mfd, b"", _AT_EMPTY_PATH, attr, len(attr))
        _in_cell_ns(mntns_fd, lambda: _sys(
            "move_mount", op.target, mfd, b"", target, b"",
            _MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH))
        return mnt_id(mfd)
    finally:
        for fd in (fs, mfd, target):
            if fd >= 0:
                os.close(fd)


def detach(op: Umount, root_fd: int, mntns_fd: int, ours: set[int]) -> int:
    """Unmount (lazily) the mount at ``op.target`` in the cell, if it is one of ``ours``
    (ids of the mounts the master made for this cell); its id."""
    fd = resolve_in_root(root_fd, op.target)
    try:
        mid = mnt_id(fd)
        if mid not in ours:
            raise Refused(errno.EPERM, f"{op.target} is not a USB mount the master made")

        def umount() -> None:
            os.fchdir(fd)
            klibc.umount2(".", abi.MNT_DETACH)

        _in_cell_ns(mntns_fd, umount)
        return mid
    finally:
        os.close(fd)
