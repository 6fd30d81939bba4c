"""One agentd per state directory: an exclusive ``flock`` on ``<state_dir>/agentd.lock``
taken before the journal, the socket or the pid file, and released by the kernel when its
holder dies (so a kill -9'd agentd leaves no stale lock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

from agent.core.errors import AgentError, KernelError

__all__ = ["LOCK_NAME", "InstanceBusyError", "InstanceLock"]

LOCK_NAME = "agentd.lock"


class InstanceBusyError(AgentError):
    """Another process holds the instance lock of this state directory."""

    def __init__(self, path: Path, holder: int | None) -> None:
        self.path = path
        self.holder = holder
        who = f"pid {holder}" if holder is not None else "a process whose pid is not written yet"
        super().__init__(
            "E_BUSY", f"another agentd ({who}) holds `{path}`",
            "one agentd per state dir: stop it first (/etc/init.d/S50agentd stop), or use "
            "another --state-dir; the lock goes by itself when its holder dies")


class InstanceLock:
    """An exclusive, non-blocking ``flock`` on ``<state_dir>/agentd.lock``, held while open.

    The kernel drops a flock when the last descriptor of its open file goes, so a lock
    left by a dead (even kill -9'd) agentd is free at once: no stale-lock clean-up, and
    the file is never removed (removing it would let two holders lock two inodes).  The
    descriptor is O_CLOEXEC: cells and tools agentd execs do not inherit it.  The
    holder's pid is written into the file for the refusal message; a loser only reads.
    """

    def __init__(self, state_dir: Path, *, pid_wait: float = 1.0) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None
        self._pid_wait = pid_wait

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> InstanceLock:
        """Take the lock or raise :class:`InstanceBusyError` (or KernelError: cannot open)."""
        if self._fd is not None:
            return self
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise KernelError.from_oserror(
                "open", str(self.path), exc,
                "agentd needs a writable state dir (see --state-dir)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise InstanceBusyError(self.path, self._holder(fd)) from None
                raise KernelError.from_oserror("flock", str(self.path), exc) from None
            finally:
                os.close(fd)
        try:  # new pid first, then cut: a reader never sees an empty file once one was written
            data = f"{os.getpid()}\n".encode()
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        except OSError as exc:
            os.close(fd)
            raise KernelError.from_oserror("write", str(self.path), exc) from None
        self._fd = fd
        return self

    def adopt(self, fd: int) -> InstanceLock:
        """Take over the lock a previous agentd passed across exec (the master's respawn):
        ``fd`` must be an open file description of this very lock file that holds the
        flock (a flock belongs to the open file, so it is held still); KernelError if not."""
        try:
            st, here = os.fstat(fd), os.stat(self.path)
            if (st.st_dev, st.st_ino) != (here.st_dev, here.st_ino):
                raise KernelError("adopt", str(self.path), errno.EBADF,
                                  "the passed descriptor is not this state dir's lock")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: a no-op
            data = f"{os.getpid()}\n".encode()
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        except OSError as exc:
            raise KernelError.from_oserror("adopt", str(self.path), exc) from None
        self._fd = fd
        return self

    def fileno(self) -> int | None:
        return self._fd

    def _holder(self, fd: int) -> int | None:
        """The holder's pid from the file; it may not be written yet just after its flock."""
        deadline = time.monotonic() + self._pid_wait
        while True:
            with contextlib.suppress(OSError, ValueError):
                first = os.pread(fd, 64, 0).split(b"\n", 1)[0]
                if first.strip():
                    return int(first)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> InstanceLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
