"""A cell's directories on the host's filesystem (thin adapter for the plan operations).

:class:`CellDirs` makes and removes what :class:`agent.core.cellops.PrepareDirs` and
:class:`agent.core.cellops.ReleaseDirs` plan: the run dir (with the cell's hosts file)
and the persistent data dir.  The ops check every path against their own roots before
calling here; this module only does the I/O and names the path in each error.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from agent.core.errors import KernelError
from agent.core.names import HOSTS_FILE

__all__ = ["CellDirs"]


class CellDirs:
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
        """Undo of :meth:`make_run_dir`: whatever is there goes, errors or not."""
        shutil.rmtree(run, ignore_errors=True)

    def remove_run_dir(self, run: Path) -> None:
        """The run dir and everything in it; already gone is fine."""
        try:
            shutil.rmtree(run)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise KernelError.from_oserror("rmtree", str(run), exc) from exc

    def make_data_dir(self, data: Path, uid: int, gid: int) -> bool:
        """The persistent data dir (0700, owned by the cell's host ids) unless it exists;
        True if this call made it."""
        if data.exists():
            return False
        try:
            data.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            data.mkdir(mode=0o700)
        except OSError as exc:
            raise KernelError.from_oserror("mkdir", str(data), exc) from exc
        try:
            os.chown(data, uid, gid)
        except OSError as exc:
            self.remove_data_dir_if_empty(data)
            raise KernelError.from_oserror("chown", str(data), exc) from exc
        return True

    def remove_data_dir_if_empty(self, data: Path) -> None:
        """Only an empty data dir goes: persistent data is never thrown away."""
        try:
            data.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                raise KernelError.from_oserror("rmdir", str(data), exc) from exc
