"""PSI triggers (thin kernel adapter): wake the event loop when a cell stalls.

A trigger is a pressure file (``/sys/fs/cgroup/<cell>/memory.pressure``,
``/proc/pressure/cpu`` ...) opened ``O_RDWR | O_NONBLOCK`` with
``"some <stall_us> <window_us>"`` written to it: the kernel then signals
``POLLPRI`` on that fd, at most once per window, whenever the tasks stalled for
more than ``stall_us`` within a moving ``window_us``
(Documentation/accounting/psi.rst).  Nothing polls: between bursts the loop sleeps.

Two kernel facts shape this module:

* asyncio's ``add_reader`` waits for ``EPOLLIN``, which a pressure file always
  reports; ``POLLPRI`` is what matters.  So each trigger fd is registered for
  ``EPOLLPRI`` in an epoll instance of its own, and *that* epoll fd (readable
  when the trigger fired) is what :meth:`PsiTrigger.fileno` returns and the loop
  waits on.
* The PSI poll is destructive: polling a trigger clears its event.  When the
  loop's epoll checks whether the inner epoll is ready, the kernel polls the
  trigger and consumes the event; a later ``epoll.poll(0)`` on the inner fd then
  returns nothing.  An inner epoll shared by many triggers would wake the loop
  without saying which trigger fired (measured on 6.x).  Hence one small epoll
  per trigger: its readiness alone identifies the trigger.  The inner poll still
  reports ``EPOLLERR``, which is persistent: the file went away (the cgroup was
  removed), and the trigger is dropped instead of waking the loop forever.

The kernel's ``psi_write`` replaces the last byte written with a NUL, so the
trigger string is written NUL-terminated.  Without ``CAP_SYS_RESOURCE`` the
window must be a multiple of 2 s: :class:`PsiTrigger` then rounds the window up
(``unprivileged_ok``) and says so in ``window_us``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
from collections.abc import Callable
from typing import Literal

from agent.core.errors import ConfigError, KernelError
from agent.kernel.knobs import avg10_of

__all__ = ["PsiTrigger", "PsiWatcher", "trigger_line"]

log = logging.getLogger(__name__)

WINDOW_MIN_US = 500_000
WINDOW_MAX_US = 10_000_000
UNPRIVILEGED_WINDOW_US = 2_000_000

_HINTS = {
    errno.ENOENT: "no such pressure file: is the cgroup there, and the kernel built with "
                  "CONFIG_PSI?",
    errno.EOPNOTSUPP: "PSI is disabled: boot with psi=1 (CONFIG_PSI_DEFAULT_DISABLED=y)",
    errno.EINVAL: "the kernel refused the trigger: window 0.5..10 s, stall <= window, and "
                  "without CAP_SYS_RESOURCE the window must be a multiple of 2 s",
    errno.EBUSY: "this fd already has a trigger",
    errno.EACCES: "agentd must be able to write the pressure file",
    errno.EPERM: "agentd must be able to write the pressure file",
}


def trigger_line(kind: str, stall_us: int, window_us: int) -> bytes:
    """The bytes to write, NUL-terminated; raises ConfigError for values the kernel
    would refuse anyway, before touching it."""
    if kind not in ("some", "full"):
        raise ConfigError("E_PSI_TRIGGER", f"PSI trigger kind {kind!r} is not some or full")
    if not WINDOW_MIN_US <= window_us <= WINDOW_MAX_US or not 0 < stall_us <= window_us:
        raise ConfigError("E_PSI_TRIGGER",
                          f"PSI trigger {kind} {stall_us} {window_us}: need 0 < stall <= "
                          f"window and window in {WINDOW_MIN_US}..{WINDOW_MAX_US} us")
    return f"{kind} {stall_us} {window_us}".encode() + b"\0"


class PsiTrigger:
    """One armed trigger.  ``fileno()`` is readable when it fired (see module doc)."""

    def __init__(self, path: str, stall_us: int = 150_000, window_us: int = 1_000_000,
                 kind: Literal["some", "full"] = "some", *, unprivileged_ok: bool = True
                 ) -> None:
        self.path = path
        line = trigger_line(kind, stall_us, window_us)
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise KernelError.from_oserror("open", path, e, _HINTS.get(e.errno or 0)) from None
        try:
            try:
                os.write(self._fd, line)
            except OSError as e:
                rounded = -(-window_us // UNPRIVILEGED_WINDOW_US) * UNPRIVILEGED_WINDOW_US
                if (e.errno != errno.EINVAL or not unprivileged_ok or rounded == window_us
                        or rounded > WINDOW_MAX_US):
                    raise
                window_us = rounded  # no CAP_SYS_RESOURCE: 2 s multiples only
                line = trigger_line(kind, stall_us, window_us)
                os.write(self._fd, line)
            self._ep = select.epoll(1, select.EPOLL_CLOEXEC)
            self._ep.register(self._fd, select.EPOLLPRI)
        except OSError as e:
            os.close(self._fd)
            raise KernelError.from_oserror("write", f"{path} <- {line[:-1].decode()!r}", e,
                                           _HINTS.get(e.errno or 0)) from None
        self.kind, self.stall_us, self.window_us = kind, stall_us, window_us
        self.closed = False

    def fileno(self) -> int:
        """The fd to wait on for readability (an epoll fd watching the trigger's EPOLLPRI)."""
        return self._ep.fileno()

    @property
    def psi_fd(self) -> int:
        return self._fd

    def consume(self) -> Literal["fired", "gone"]:
        """Call when ``fileno()`` was readable: drain it and say whether the trigger is alive.
        (The readiness itself was the event; see the module doc.)"""
        for _, ev in self._ep.poll(0):
            if ev & (select.EPOLLERR | select.EPOLLHUP):
                return "gone"
        return "fired"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the trigger fires (True) or ``timeout`` passes (False)."""
        for _, ev in self._ep.poll(-1 if timeout is None else timeout):
            if ev & (select.EPOLLERR | select.EPOLLHUP):
                raise KernelError("poll", self.path, errno.ENODEV,
                                  "the pressure file went away (cgroup removed?)")
            if ev & select.EPOLLPRI:
                return True
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._ep.close()
            os.close(self._fd)  # releases the trigger in the kernel

    def __enter__(self) -> PsiTrigger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PsiTrigger({self.path!r}, {self.kind} {self.stall_us} {self.window_us})"


Callback = Callable[[str, str], None]


class PsiWatcher:
    """Many triggers on one asyncio loop: ``callback(cell, resource)`` when one fires;
    ``on_gone(cell, resource)`` once when its file disappears (the trigger is dropped).
    A failing callback is logged and the watcher keeps going."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callback,
                 on_gone: Callback | None = None) -> None:
        self._loop = loop
        self._callback = callback
        self._on_gone = on_gone
        self._triggers: dict[tuple[str, str], PsiTrigger] = {}

    def add(self, cell: str, resource: str, path: str, stall_us: int = 150_000,
            window_us: int = 1_000_000) -> PsiTrigger:
        key = (cell, resource)
        self.remove(cell, resource)
        trig = PsiTrigger(path, stall_us, window_us)
        self._triggers[key] = trig
        self._loop.add_reader(trig.fileno(), self._ready, key)
        return trig

    def remove(self, cell: str, resource: str | None = None) -> None:
        for key in [k for k in self._triggers if k[0] == cell and resource in (None, k[1])]:
            trig = self._triggers.pop(key)
            self._loop.remove_reader(trig.fileno())
            trig.close()

    def watched(self) -> list[tuple[str, str]]:
        return sorted(self._triggers)

    def close(self) -> None:
        for cell, res in list(self._triggers):
            self.remove(cell, res)

    def _ready(self, key: tuple[str, str]) -> None:
        trig = self._triggers.get(key)
        if trig is None:
            return
        state = trig.consume()
        if state == "gone":
            self.remove(*key)
        try:
            (self._callback if state == "fired" else self._on_gone or _ignore)(*key)
        except Exception:
            log.exception("PSI %s callback failed for %s/%s", state, *key)


def _ignore(cell: str, resource: str) -> None:
    pass


BOX_MEMORY_PRESSURE = "/proc/pressure/memory"


class BoxMemoryPressure:
    """The box's memory ``some avg10`` (None without PSI), through an fd kept open: one
    ``pread`` a reading."""

    def __init__(self, path: str = BOX_MEMORY_PRESSURE) -> None:
        self.path = path
        self._fd: int | None = None

    def __call__(self) -> float | None:
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            text = os.pread(self._fd, 4096, 0).decode()
            return avg10_of(text)
        except (OSError, ValueError):  # no PSI (absent, psi=0: EOPNOTSUPP)
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
