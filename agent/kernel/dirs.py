"""A cell's directories on the host's filesystem (thin adapter for the plan operations).

:class:`CellDirs` makes and removes what :class:`agent.core.cellops.PrepareDirs`,
:class:`agent.core.cellops.MountData` and the destroy steps plan: the run dir (with the
cell's hosts file) and the mount of the cell's data image below it
(:mod:`agent.kernel.dataimage`).  The ops check every path against their own roots
before calling here; this module only does the I/O and names the path in each error.

A run dir is removed without ever crossing into another file system: a data image
still mounted below it (an unmount that failed) makes the removal fail, never recurse
into the cell's persistent data.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.core.cellctx import DataMount
from agent.core.datavol import StateUsage
from agent.core.errors import KernelError
from agent.core.names import HOSTS_FILE
from agent.kernel.dataimage import DataImages

__all__ = ["CellDirs", "remove_tree"]


def remove_tree(top: Path) -> None:
    """``rm -r top`` on top's own file system only: raises EBUSY naming the first mount
    point found below it, before anything is removed.  Already gone is fine."""
    try:
        dev = os.lstat(top).st_dev
    except FileNotFoundError:
        return
    for root, dirs, _files, rootfd in os.fwalk(top, follow_symlinks=False):
        for d in dirs:
            if os.stat(d, dir_fd=rootfd, follow_symlinks=False).st_dev != dev:
                raise KernelError("rmtree", os.path.join(root, d), errno.EBUSY,
                                  "a file system is still mounted there: unmount it first")
    for _root, dirs, files, rootfd in os.fwalk(top, topdown=False, follow_symlinks=False):
        for name in files:
            os.unlink(name, dir_fd=rootfd)
        for d in dirs:
            if stat.S_ISLNK(os.stat(d, dir_fd=rootfd, follow_symlinks=False).st_mode):
                os.unlink(d, dir_fd=rootfd)
            else:
                os.rmdir(d, dir_fd=rootfd)
    os.rmdir(top)


class CellDirs:
    """``images``: the data image adapter (a real one unless a test passes a fake)."""

    def __init__(self, images: DataImages | None = None) -> None:
        self.images = images if images is not None else DataImages()

    def make_run_dir(self, run: Path, hosts: str) -> None:
        """The run dir (0700).  With ``hosts`` (the text of the cell's /etc/hosts) it also
        holds the file ``hosts`` (0644) and is 0711, so the cell's mapped root can reach
        the file for the read-only bind mount; everything else in it stays 0600."""
        try:
            run.mkdir(mode=0o700, parents=True, exist_ok=True)
            if hosts:
                run.chmod(0o711)
                path = run / HOSTS_FILE
                path.write_text(hosts)
                path.chmod(0o644)
        except OSError as exc:
            raise KernelError.from_oserror("mkdir", exc.filename or str(run), exc) from exc

    def discard_run_dir(self, run: Path) -> None:
        """Undo of :meth:`make_run_dir`: whatever is there goes, errors or not; with a
        file system still mounted below it the dir stays whole (the reclaim loop
        collects the mount)."""
        try:
            remove_tree(run)
        except (OSError, KernelError):
            pass

    def remove_run_dir(self, run: Path) -> None:
        """The run dir and everything in it; already gone is fine; a mount below it is
        an error (EBUSY), not a reason to delete what is mounted."""
        try:
            remove_tree(run)
        except OSError as exc:
            raise KernelError.from_oserror("rmtree", exc.filename or str(run), exc) from exc

    def mount_data(self, req: DataMount) -> Mapping[str, Any]:
        return self.images.mount(req)

    def unmount_data(self, mount: Path) -> None:
        self.images.unmount(mount)

    def data_usage(self, images_dir: Path, state_dir: Path) -> StateUsage:
        """For admission: the state file system's free bytes and the images on it."""
        return self.images.usage(images_dir, state_dir)
