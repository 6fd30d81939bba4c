"""Seal a file tree and check it against its seal (the I/O half of :mod:`agent.core.seal`).

:func:`seal_tree` walks a tree without following symlinks and hashes every regular file
(SHA-256, 1 MiB at a time); device nodes, FIFOs and sockets are refused (an image holds
none: the agent makes /dev for a cell).  :func:`hash_fd` hashes an open file, for the
exec monitor, which checks the very file the kernel is about to execute.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from agent.core.errors import KernelError
from agent.core.seal import Entry, Seal

__all__ = ["hash_fd", "seal_tree"]

_CHUNK = 1 << 20


def hash_fd(fd: int) -> tuple[str, int]:
    """SHA-256 (hex) and size of the open file ``fd``, read from offset 0 with pread."""
    h, off = hashlib.sha256(), 0
    while True:
        block = os.pread(fd, _CHUNK, off)
        if not block:
            return h.hexdigest(), off
        h.update(block)
        off += len(block)


def _entry(root: Path, path: Path) -> Entry | None:
    rel = path.relative_to(root).as_posix()
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return Entry(rel, "l", target=os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return None
    if not stat.S_ISREG(st.st_mode):
        raise KernelError("seal", str(path), 22, "an image holds only files, links and "
                          "directories: remove device nodes, FIFOs and sockets from it")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        digest, size = hash_fd(fd)
    finally:
        os.close(fd)
    return Entry(rel, "f", digest, size, stat.S_IMODE(st.st_mode))


def seal_tree(root: Path, *, skip: tuple[str, ...] = ()) -> Seal:
    """The seal of the tree at ``root`` (relative paths starting with a ``skip`` prefix,
    e.g. mount points of writable areas, are left out)."""
    entries: list[Entry] = []
    try:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            here = Path(dirpath)
            for name in sorted(dirnames + filenames):
                p = here / name
                rel = p.relative_to(root).as_posix()
                if any(rel == s or rel.startswith(s.rstrip("/") + "/") for s in skip):
                    if name in dirnames:
                        dirnames.remove(name)
                    continue
                e = _entry(root, p)
                if e is not None:
                    entries.append(e)
    except OSError as exc:
        raise KernelError.from_oserror("seal", str(exc.filename or root), exc) from exc
    return Seal.of(entries)
