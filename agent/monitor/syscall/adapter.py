"""Channel 2's kernel adapter: a trapped process's memory and identity, and the simple
host operations (host name, clock, adjtimex, reboot).

:class:`CellMemory` follows seccomp_unotify(2): it opens ``/proc/PID/mem`` (and any
other handle on the process), *then* checks the notification id is still valid, so the
handles belong to the process that trapped and not to one that reused its pid; only
then does it copy.  The master decides and acts on the copies (agent.monitor.syscall.ops),
never on the cell's pointers.  Everything takes the proc root as a parameter.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from agent.core.errors import KernelError
from agent.kernel import seccomp as notify
from agent.monitor.syscall.ops import TIMEX_SIZE, Need, Refused, map_id

__all__ = ["CellMemory", "Gone", "HostOps", "adjtime", "host_ids", "kill_trapped", "proc_attrs",
           "set_clock", "set_hostname", "tgid"]

_CHUNK = 256
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setdomainname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.adjtimex.argtypes = [ctypes.c_char_p]


class Gone(Exception):
    """The trapped process went away (its notification is no longer valid)."""


class CellMemory:
    """Copies out of (and results into) the memory of the process behind notification
    ``nid`` on ``listener``.  Use as a context manager; every handle is opened before
    the id check."""

    def __init__(self, listener: int, nid: int, hpid: int, proc: Path = Path("/proc")) -> None:
        self.listener = listener
        self.nid = nid
        self.hpid = hpid
        self.proc = proc
        self.fds: dict[str, int] = {}

    def open(self, *extra: str) -> CellMemory:
        """Open ``mem`` and each of ``extra`` (``root`` as O_PATH, ``ns/mnt``, ``ns/user``)
        of the process, then check the id.  :class:`Gone` if it went away."""
        base = self.proc / str(self.hpid)
        try:
            self.fds["mem"] = os.open(base / "mem", os.O_RDWR | os.O_CLOEXEC)
            for name in extra:  # a namespace for setns or an idmap must be opened for real
                mode = os.O_PATH if name == "root" else os.O_RDONLY
                self.fds[name] = os.open(base / name, mode | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as exc:
            self.close()
            raise Gone(str(exc)) from None
        except OSError:
            self.close()
            raise
        self.check()
        return self

    def check(self) -> None:
        if not notify.id_valid(self.listener, self.nid):
            self.close()
            raise Gone(f"notification {self.nid} of pid {self.hpid}")

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> CellMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, addr: int, size: int) -> bytes | None:
        """``size`` bytes at ``addr``; None if any of them is not mapped."""
        if size == 0:
            return b""
        try:
            data = os.pread(self.fds["mem"], size, addr)
        except OSError:
            return None
        return data if len(data) == size else None

    def read_string(self, addr: int, limit: int) -> bytes | None:
        """The NUL-terminated string at ``addr`` without its NUL; None if unmapped or
        longer than ``limit`` (a string may end just before an unmapped page, so it is
        read in small chunks)."""
        out = bytearray()
        while len(out) < limit + 1:
            want = min(_CHUNK - (addr + len(out)) % _CHUNK, limit + 1 - len(out))
            try:
                data = os.pread(self.fds["mem"], want, addr + len(out))
            except OSError:
                return None
            if not data:
                return None
            nul = data.find(0)
            if nul >= 0:
                out += data[:nul]
                return bytes(out)
            out += data
        return None

    def copy(self, needs: tuple[Need, ...], args: tuple[int, ...]) -> dict[int, bytes] | int:
        """Every copy :func:`agent.monitor.syscall.ops.plan` asked for, or the errno for
        the cell (EFAULT: unmapped; ENAMETOOLONG: no NUL within the limit)."""
        out: dict[int, bytes] = {}
        for need in needs:
            addr = args[need.arg]
            if need.string:
                got = self.read_string(addr, need.size)
                if got is None:
                    return errno.EFAULT if self.read(addr, 1) is None else errno.ENAMETOOLONG
            else:
                got = self.read(addr, need.size)
                if got is None:
                    return errno.EFAULT
            out[need.arg] = got
        self.check()  # still the same process: the copies are its
        return out

    def write(self, addr: int, data: bytes) -> bool:
        try:
            return os.pwrite(self.fds["mem"], data, addr) == len(data)
        except OSError:
            return False


def proc_attrs(hpid: int, proc: Path = Path("/proc")) -> dict[str, Any]:
    """``pid`` (in the cell's pid namespace), ``hpid``, ``comm``, ``exe`` (as the cell
    sees it) of a process; None for what could not be read (it may be gone).  Read for
    every notification, so with as few calls as can be: one read of ``status``, one
    ``readlink``."""
    out: dict[str, Any] = {"pid": None, "hpid": hpid, "comm": None, "exe": None}
    base = f"{proc}/{hpid}"
    with contextlib.suppress(OSError, ValueError, IndexError):
        fd = os.open(base + "/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        out["comm"] = data[6:data.index(b"\n")].decode(errors="replace")  # "Name:\t..."
        at = data.find(b"\nNSpid:")
        if at >= 0:
            out["pid"] = int(data[at + 7:data.index(b"\n", at + 1)].split()[-1])
    with contextlib.suppress(OSError):
        out["exe"] = os.readlink(base + "/exe").removesuffix(" (deleted)")
    return out


def _status(hpid: int, proc: Path) -> dict[str, str]:
    text = (proc / str(hpid) / "status").read_text(errors="replace")
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


def tgid(hpid: int, proc: Path = Path("/proc")) -> int | None:
    """The thread group (process) of thread ``hpid``; None if it is gone."""
    try:
        return int(_status(hpid, proc)["Tgid"])
    except (OSError, KeyError, ValueError):
        return None


def kill_trapped(listener: int, nid: int, hpid: int, proc: Path = Path("/proc")) -> bool:
    """SIGKILL the process of trapped thread ``hpid``: through a pidfd of its thread group
    opened before the id check, so the signal cannot reach a process that reused the pid.
    False if it was gone already."""
    group = tgid(hpid, proc)
    if group is None:
        return False
    try:
        pidfd = os.pidfd_open(group)
    except OSError:
        return False
    try:
        if not notify.id_valid(listener, nid):
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except (OSError, KernelError):
        return False
    finally:
        os.close(pidfd)


def host_ids(hpid: int, uid: int | None, gid: int | None, proc: Path = Path("/proc")
             ) -> tuple[int, int]:  # fmt: skip
    """Host uid and gid for a cell's ``uid``/``gid`` (mapped through the process's user
    namespace); None: the process's own filesystem ids.  A cell id outside its map is
    refused."""
    st = _status(hpid, proc)
    out = []
    for key, want, mapfile in (("Uid", uid, "uid_map"), ("Gid", gid, "gid_map")):
        if want is None:
            out.append(int(st[key].split()[3]))  # fsuid / fsgid, as the host sees it
            continue
        host = map_id(want, (proc / str(hpid) / mapfile).read_text())
        if host is None:
            raise Refused(errno.EINVAL, f"{key.lower()} {want} is not mapped in the cell")
        out.append(host)
    return out[0], out[1]


def set_hostname(name: str, domain: bool = False) -> int:
    """Set the host's name (or NIS domain name) in agentd's own UTS namespace: 0 or an
    errno."""
    try:
        if domain:
            raw = name.encode()
            if _libc.setdomainname(raw, len(raw)) < 0:
                return ctypes.get_errno()
        else:
            socket.sethostname(name)
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0


def set_clock(ns: int) -> tuple[int, float]:
    """Set CLOCK_REALTIME; (0 or errno, the step in seconds)."""
    before = time.clock_gettime_ns(time.CLOCK_REALTIME)
    try:
        time.clock_settime_ns(time.CLOCK_REALTIME, ns)
    except OSError as exc:
        return exc.errno or errno.EIO, 0.0
    return 0, round((ns - before) / 1e9, 3)


def adjtime(timex: bytes) -> tuple[int, int, bytes]:
    """adjtimex(2) on the host with the cell's struct: (errno, return value, the struct
    to copy back)."""
    if len(timex) != TIMEX_SIZE:
        raise KernelError("adjtimex", "struct timex", errno.EINVAL, f"{TIMEX_SIZE} bytes")
    buf = ctypes.create_string_buffer(timex, TIMEX_SIZE)
    ret = _libc.adjtimex(buf)
    if ret < 0:
        return ctypes.get_errno(), 0, timex
    return 0, int(ret), buf.raw


class HostOps:
    """The host-wide operations the master performs for cells (a class so a test on a
    development machine can leave its clock alone; the box tests the real one)."""

    set_hostname = staticmethod(set_hostname)
    set_clock = staticmethod(set_clock)
    adjtime = staticmethod(adjtime)
