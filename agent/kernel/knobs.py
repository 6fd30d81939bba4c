"""Kernel adapters of the tuner and the reclaim loop (agent.daemon.tuner, agent.daemon.reclaim).

:class:`Knobs` writes single cgroup files (``cpu.max``, ``memory.high``, ...) for the v2
or the v1 backend; :class:`PriWatch` wakes the loop when ``memory.events`` changes;
:class:`SampleReader` keeps a cell's sample files open and re-reads each with one
``pread`` (kernfs regenerates the text at offset 0), so a sample costs four system calls,
not four opens, reads and closes through pathlib.
Paths come from the backend, so a fake cgroupfs stands in for tests.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
from collections.abc import Callable
from pathlib import Path

from agent.core.errors import KernelError
from agent.core.tunerstate import Sample
from agent.kernel.cgroup import CgroupBackend

__all__ = ["Knobs", "PriWatch", "SampleReader", "avg10_of"]

log = logging.getLogger(__name__)

class Knobs:
    """Single cgroup files the tuner and the reclaim loop write, for either backend.

    v2: ``cpu.max``, ``memory.high``, ``memory.max``, ``cpu.weight``, ``memory.reclaim``.
    v1 (degraded, docs/cgroup-v1.md): ``cpu.cfs_quota_us``, ``memory.soft_limit_in_bytes``
    (no throttling at high), ``memory.limit_in_bytes``, ``cpu.shares``; no reclaim."""

    PERIOD_US = 100_000

    def __init__(self, backend: CgroupBackend) -> None:
        self.backend = backend
        self.v1 = backend.version == 1

    def _path(self, cell: str, v2: str, v1: tuple[str, str] | None) -> Path | None:
        if not self.v1:
            return self.backend.leaf(cell) / v2
        if v1 is None:
            return None
        return self.backend.cell_dir(cell, v1[0]) / v1[1]

    @staticmethod
    def write(path: Path, value: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        except OSError as exc:
            raise KernelError.from_oserror("write", str(path), exc) from None
        try:
            os.write(fd, value.encode())
        except OSError as exc:
            raise KernelError.from_oserror("write", f"{path} <- {value!r}", exc) from None
        finally:
            os.close(fd)

    def _set(self, cell: str, v2: str, v1: tuple[str, str] | None, value: str) -> None:
        path = self._path(cell, v2, v1)
        if path is not None:
            self.write(path, value)

    def set_cpu_max(self, cell: str, millicpu: int) -> None:
        quota = max(1000, millicpu * self.PERIOD_US // 1000)
        if self.v1:
            self._set(cell, "", ("cpu", "cpu.cfs_quota_us"), str(quota))
        else:
            self._set(cell, "cpu.max", None, f"{quota} {self.PERIOD_US}")

    def set_memory_high(self, cell: str, value: int) -> None:
        self._set(cell, "memory.high", ("memory", "memory.soft_limit_in_bytes"), str(value))

    def set_memory_max(self, cell: str, value: int) -> None:
        self._set(cell, "memory.max", ("memory", "memory.limit_in_bytes"), str(value))

    def memory_max(self, cell: str) -> int | None:
        path = self._path(cell, "memory.max", ("memory", "memory.limit_in_bytes"))
        assert path is not None
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise KernelError.from_oserror("read", str(path), exc) from None
        return None if text == "max" or not text.isdigit() else int(text)

    def set_memory(self, cell: str, high: int, max_: int, old_max: int | None = None) -> None:
        """Both memory limits, in the order that keeps ``high <= max`` after each write
        and lets the kernel reclaim to ``high`` before a lower ``max`` bites."""
        cur = self.memory_max(cell) if old_max is None else old_max
        if cur is not None and max_ < cur:
            self.set_memory_high(cell, high)
            self.set_memory_max(cell, max_)
        else:
            self.set_memory_max(cell, max_)
            self.set_memory_high(cell, high)

    def set_cpu_weight(self, cell: str, weight: int) -> None:
        if self.v1:
            from agent.core.cgroupv1map import cpu_shares

            self._set(cell, "", ("cpu", "cpu.shares"), str(cpu_shares(weight)))
        else:
            self._set(cell, "cpu.weight", None, str(weight))

    def cpu_weight(self, cell: str) -> int | None:
        path = self._path(cell, "cpu.weight", None)
        try:
            return int(path.read_text()) if path is not None else None
        except (OSError, ValueError):
            return None

    def reclaim(self, cell: str, nbytes: int) -> bool:
        """Ask the kernel to reclaim ``nbytes`` from the cell (v2 ``memory.reclaim``);
        False if it reclaimed less (EAGAIN) or the kernel has no such file."""
        path = self._path(cell, "memory.reclaim", None)
        if path is None or not path.exists():
            return False
        try:
            self.write(path, str(nbytes))
        except KernelError as exc:
            if exc.errno == errno.EAGAIN:
                return False
            raise
        return True

    def pressure_path(self, cell: str, resource: str) -> Path | None:
        path = self._path(cell, f"{resource}.pressure", None)
        return path if path is not None and path.exists() else None

    def pressure_avg10(self, cell: str, resource: str) -> float | None:
        """The cell's ``some avg10`` for ``resource`` (None: no PSI file, or unreadable)."""
        path = self.pressure_path(cell, resource)
        if path is None:
            return None
        try:
            return avg10_of(path.read_text())
        except (OSError, ValueError):
            return None

    def sample_reader(self, cell: str) -> SampleReader | None:
        """A reader of the cell's samples (v2 only; v1 samples through the backend)."""
        if self.v1:
            return None
        return SampleReader(self.backend.leaf(cell))

    def events_path(self, cell: str) -> Path | None:
        path = self._path(cell, "memory.events", None)
        return path if path is not None and path.exists() else None


class PriWatch:
    """Wake the loop when a kernfs file signals ``EPOLLPRI`` (``memory.events``).

    The file's fd is registered for EPOLLPRI in an epoll of its own, and that epoll fd is
    what the loop waits on (a kernfs file is always EPOLLIN-readable).  Reading the file
    from the start re-arms it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str,
                 callback: Callable[[str], None]) -> None:
        self.path = path
        self._loop = loop
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._ep = select.epoll(1, select.EPOLL_CLOEXEC)
            self._ep.register(self._fd, select.EPOLLPRI)
        except OSError:
            os.close(self._fd)
            raise
        self._callback = callback
        self.read()  # baseline; clears a pending notification
        loop.add_reader(self._ep.fileno(), self._ready)

    def read(self) -> str:
        return os.pread(self._fd, 4096, 0).decode()

    def _ready(self) -> None:
        gone = any(ev & (select.EPOLLERR | select.EPOLLHUP) for _, ev in self._ep.poll(0))
        try:
            text = self.read()
        except OSError:
            self.close()
            return
        if gone and not text:
            self.close()
            return
        try:
            self._callback(text)
        except Exception:
            log.exception("memory.events callback failed for %s", self.path)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._ep.fileno())
            self._ep.close()
            os.close(self._fd)
            self._fd = -1


def avg10_of(text: str) -> float:
    """``some avg10=`` of a PSI file (its first line); ValueError if malformed."""
    i = text.find("avg10=")
    return float(text[i + 6:text.index(" ", i)]) if i >= 0 else 0.0


class SampleReader:
    """A v2 cell's ``cpu.stat``, ``memory.current`` and PSI files, kept open.

    ``read()`` raises :class:`~agent.core.errors.KernelError` once the cgroup is gone.  A
    missing PSI file (``psi=0``) reads as no pressure."""

    def __init__(self, leaf: Path) -> None:
        self.leaf = leaf
        self._fds: dict[str, int] = {}
        try:
            for name in ("cpu.stat", "memory.current", "memory.pressure", "cpu.pressure"):
                try:
                    self._fds[name] = os.open(leaf / name, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    if not name.endswith(".pressure"):
                        raise
        except OSError as exc:
            self.close()
            raise KernelError.from_oserror("open", str(leaf), exc) from None

    def _text(self, name: str) -> str:
        fd = self._fds.get(name)
        if fd is None:
            return ""
        try:
            return os.pread(fd, 4096, 0).decode()
        except OSError as exc:
            raise KernelError.from_oserror("read", str(self.leaf / name), exc) from None

    def read(self, at: float) -> Sample:
        cpu = self._text("cpu.stat")
        if not cpu.startswith("usage_usec "):
            raise KernelError("parse", str(self.leaf / "cpu.stat"), errno.EINVAL,
                              "cpu.stat has no usage_usec first: is this cgroup v2?")
        try:
            usage = int(cpu[11:cpu.index("\n")])
            current = int(self._text("memory.current"))
            mem = avg10_of(self._text("memory.pressure"))
            cpu_p = avg10_of(self._text("cpu.pressure"))
        except ValueError as exc:
            raise KernelError("parse", str(self.leaf), errno.EINVAL, str(exc)) from None
        return Sample(usage, current, mem, cpu_p, at)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
