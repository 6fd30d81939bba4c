"""Data images: made, checked, grown, loop-mounted and re-owned (thin adapter).

What :class:`agent.core.cellops.MountData` plans, carried out (docs/data-dirs.md):

1. **make** (owner, image missing): a sparse file of the data dir's size, ``mke2fs -t
   ext4 -m 0`` with the root owned by the service's mapped ids, written as
   ``<name>.img.new`` and renamed, so a crash never leaves a half-made image under the
   real name;
2. **check** (nothing has it mounted): ``e2fsck -p`` (``-f`` before a grow), which
   repairs what a power cut left, and ``e2fsck -y -f`` for what preening may not fix
   (an unattended box has no one to answer); a file system still broken after that is
   refused (``E_DATA_FSCK``), never mounted;
3. **grow** (owner, file system smaller than the size asked): the file is extended and
   ``resize2fs`` run offline; images are never shrunk;
4. **mount** the image's loop device (:mod:`agent.kernel.loopdev`, one per image, shared
   by every mount of it) at the cell's data mount point, ``nosuid,nodev,noexec,noatime``,
   ``errors=remount-ro`` and ``noinit_itable``; a reader's mount is then made read-only;
5. **own** (owner): files of another uid range (the service's range changed: the slot
   table was lost, or ``userns`` was reconfigured) are shifted into the cell's range, the
   root last so an interrupted shift resumes; the root is the service's user's.

One lock serialises all of it in agentd (plans run in worker threads), so an image is
never bound to two loop devices.  The image is never deleted here.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

from agent.core import syscalls as abi
from agent.core.cellctx import DataMount
from agent.core.datavol import IMAGE_SUFFIX, ImageUse, StateUsage
from agent.core.errors import AgentError, KernelError, NotFoundError
from agent.kernel import libc, loopdev
from agent.kernel.journal import fsync_dir

__all__ = ["TOOLS_PATH", "DataImages", "fs_size"]

log = logging.getLogger(__name__)

TOOLS_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
_MS_NOATIME = 1024
_MOUNT_FLAGS = abi.MS_NOSUID | abi.MS_NODEV | abi.MS_NOEXEC | _MS_NOATIME
# remount-ro on errors (the cell sees EROFS, e2fsck repairs at the next mount);
# noinit_itable: no background zeroing of the inode tables mke2fs left uninitialised
# (writes to flash that nothing needs: the group descriptors say they are unused)
_MOUNT_DATA = "errors=remount-ro,noinit_itable"
_UMOUNT_NOFOLLOW = 8
_MAX_STACK = 32
_SUPER = struct.Struct("<4xI16xI")  # s_blocks_count_lo (at 4), s_log_block_size (at 24)
_LOCK = threading.Lock()


def fs_size(image: Path) -> tuple[int, int]:
    """(bytes, block size) of the ext4 file system in ``image``, from its superblock."""
    with open(image, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    if len(sb) < 1024 or sb[56:58] != b"\x53\xef":  # s_magic
        raise AgentError("E_DATA_FSCK", f"{image} holds no ext4 file system",
                         "move the file away: agentd makes a new, empty image")
    lo, log_bs = _SUPER.unpack_from(sb)
    incompat = struct.unpack_from("<I", sb, 0x60)[0]
    hi = struct.unpack_from("<I", sb, 0x150)[0] if incompat & 0x80 else 0  # 64bit
    bsize = 1024 << log_bs
    return ((hi << 32) | lo) * bsize, bsize


class DataImages:
    """``dev``/``sys_block``: where loop devices are; ``tools``: the PATH e2fsprogs is
    found on."""

    def __init__(self, dev: Path = Path("/dev"), sys_block: Path = Path("/sys/block"),
                 tools: str = TOOLS_PATH) -> None:
        self.dev = dev
        self.sys_block = sys_block
        self.tools = tools

    # ------------------------------------------------------------------ tools
    def _run(self, tool: str, *args: str, ok: tuple[int, ...] = (0,)) -> None:
        exe = shutil.which(tool, path=self.tools)
        if exe is None:
            raise AgentError("E_DATA_TOOL", f"{tool} not found on {self.tools}",
                             "data dirs need e2fsprogs (mke2fs, e2fsck, resize2fs)")
        r = subprocess.run([exe, *args], capture_output=True, text=True, check=False)
        if r.returncode not in ok:
            out = " ".join((r.stdout + r.stderr).split())[-300:]
            code = "E_DATA_FSCK" if tool == "e2fsck" else "E_DATA_IMAGE"
            raise AgentError(code, f"{tool} {' '.join(args)} exited {r.returncode}: {out}",
                             "stop the cell and repair the image by hand (e2fsck -f -y "
                             "IMAGE), or move it away to start with an empty one")

    # ------------------------------------------------------------------ steps
    def _make(self, req: DataMount) -> bool:
        if req.image.exists():
            return False
        req.image.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = req.image.with_name(req.image.name + ".new")
        tmp.unlink(missing_ok=True)  # a make a crash interrupted
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, req.size)
            finally:
                os.close(fd)
            self._run("mke2fs", "-q", "-F", "-t", "ext4", "-m", "0",
                      "-L", req.image.stem[:16], "-E",
                      f"root_owner={req.uid}:{req.gid},nodiscard", str(tmp))
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, req.image)
            fsync_dir(req.image.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise KernelError.from_oserror("make image", str(req.image), exc) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return True

    def _check_and_grow(self, req: DataMount) -> bool:
        """e2fsck, and resize2fs if the file system is smaller than asked; True if grown."""
        size, bsize = fs_size(req.image)
        grow = not req.readonly and size + bsize <= req.size
        try:
            self._run("e2fsck", "-p", *(["-f"] if grow else []), str(req.image), ok=(0, 1, 2))
        except AgentError as exc:  # what preening may not fix: an unattended box fixes it
            if exc.code != "E_DATA_FSCK":
                raise
            log.warning("%s: %s; repairing with e2fsck -y", req.image, exc.message)
            self._run("e2fsck", "-y", "-f", str(req.image), ok=(0, 1, 2))
        if not grow:
            return False
        try:
            if req.image.stat().st_size < req.size:
                os.truncate(req.image, req.size)
        except OSError as exc:
            raise KernelError.from_oserror("truncate", str(req.image), exc) from exc
        self._run("resize2fs", str(req.image))
        return True

    def _own(self, req: DataMount, made: bool) -> int | None:
        """The owner's files into the cell's range; the root the service user's.  The
        range the files had (its first id), or None if they were in range already."""
        root = req.mount
        st = os.lstat(root)
        shifted = None
        if not req.id_base <= st.st_uid < req.id_base + req.id_count:
            shifted = _old_base(st.st_uid, req)
            _shift(root, shifted, _old_base(st.st_gid, req), req)
        if made:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(root / "lost+found", req.uid, req.gid)
            os.chmod(root, 0o700)
        if (st.st_uid, st.st_gid) != (req.uid, req.gid) or shifted is not None:
            os.lchown(root, req.uid, req.gid)
        return shifted

    # ------------------------------------------------------------------ mount
    def mount(self, req: DataMount) -> dict[str, Any]:
        """Steps 1-5 of the module docstring; leaves nothing mounted if it fails."""
        with _LOCK:
            if os.path.ismount(req.mount):  # left by a crash: the cell is being made anew
                self._unmount(req.mount)
            made = False
            if not req.readonly:
                made = self._make(req)
            elif not req.image.exists():
                raise NotFoundError(
                    "E_DATA_SOURCE", f"no data image {req.image}: service {req.image.stem} "
                    "has not made its data dir yet", f"run {req.image.stem} once first")
            grown = False
            found = loopdev.find(req.image, self.dev, self.sys_block)
            if found is None:  # nothing has the file system mounted: check it, grow it
                grown = self._check_and_grow(req)
                found = loopdev.attach(req.image, self.dev)
            elif not req.readonly and fs_size(req.image)[0] < req.size:
                log.warning("%s: in use, not grown now", req.image)
            node, fd = found
            try:
                req.mount.mkdir(mode=0o700, exist_ok=True)
                libc.mount(str(node), str(req.mount), "ext4", _MOUNT_FLAGS, _MOUNT_DATA)
            except BaseException:
                with contextlib.suppress(OSError):
                    req.mount.rmdir()
                raise
            finally:
                os.close(fd)  # the mount holds the device now (autoclear after it)
            try:
                shifted = None if req.readonly else self._own(req, made)
                if req.readonly:
                    libc.mount(None, str(req.mount), None, abi.MS_BIND | abi.MS_REMOUNT
                               | abi.MS_RDONLY | _MOUNT_FLAGS, None)
            except OSError as exc:
                self._unmount(req.mount)
                raise KernelError.from_oserror("own", exc.filename or str(req.mount),
                                               exc) from exc
            except BaseException:
                self._unmount(req.mount)
                raise
        return {"made": made, "grown": grown, "device": str(node), "shifted_from": shifted}

    def unmount(self, mount: Path) -> None:
        """Detach whatever is mounted at ``mount`` (lazily) and remove the mount point;
        nothing mounted is success."""
        with _LOCK:
            self._unmount(mount)

    def _unmount(self, mount: Path) -> None:
        for _ in range(_MAX_STACK):
            try:
                libc.umount2(str(mount), abi.MNT_DETACH | _UMOUNT_NOFOLLOW)
            except KernelError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOENT):  # nothing (more) mounted
                    break
                raise
        else:
            raise KernelError("umount2", str(mount), errno.EBUSY,
                              f"more than {_MAX_STACK} mounts stacked there")
        try:
            mount.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise KernelError.from_oserror("rmdir", str(mount), exc) from exc

    # ------------------------------------------------------------------ admission
    def usage(self, images_dir: Path, state_dir: Path) -> StateUsage:
        """Free bytes on the state file system and every image's size and allocation."""
        where = images_dir if images_dir.is_dir() else state_dir
        try:
            st = os.statvfs(where)
        except OSError as exc:
            raise KernelError.from_oserror("statvfs", str(where), exc) from exc
        images: dict[str, ImageUse] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(images_dir):
                if entry.name.endswith(IMAGE_SUFFIX) and entry.is_file(follow_symlinks=False):
                    s = entry.stat(follow_symlinks=False)
                    images[entry.name[:-len(IMAGE_SUFFIX)]] = ImageUse(s.st_size,
                                                                       s.st_blocks * 512)
        return StateUsage(st.f_bavail * st.f_frsize, images)


def _old_base(id_: int, req: DataMount) -> int:
    """The first id of the range ``id_`` lies in: 0 for the host's own ids (a cell run
    without a user namespace), else on the grid of ranges of req's size."""
    count = req.id_count
    return 0 if id_ < count else id_ - ((id_ - req.id_base) % count)


def _shift(root: Path, uid_base: int, gid_base: int, req: DataMount) -> None:
    """Every file below ``root`` owned by the old ranges moves to the cell's (root last)."""
    count, new = req.id_count, req.id_base

    def moved(id_: int, base: int) -> int:
        return id_ - base + new if base <= id_ < base + count else id_

    log.warning("%s: files of uid range %d.. shifted to %d..", req.image, uid_base, new)
    for top, dirs, files, _ in os.fwalk(root, topdown=False, follow_symlinks=False):
        for name in (*files, *dirs):
            path = os.path.join(top, name)
            st = os.lstat(path)
            uid, gid = moved(st.st_uid, uid_base), moved(st.st_gid, gid_base)
            if (uid, gid) != (st.st_uid, st.st_gid):
                os.lchown(path, uid, gid)

