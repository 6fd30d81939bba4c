"""Whether a cell's image on disk holds what its manifest names (the command, its
working directory, the mount points of its writable areas), resolving symlinks as the cell will
see them and refusing any that would climb out of the image (design step B: a request is
checked against the resources that exist before anything is created).
"""

from __future__ import annotations

import os
import stat

from agent.core.manifest import Manifest, ManifestError
from agent.core.units import Problem

__all__ = ["check_image", "resolve_in_image"]


class _Unresolvable(Exception):
    pass


def resolve_in_image(image_dir: str, path: str, max_links: int = 40) -> str:
    """The in-image path that ``path`` names, following symlinks as the cell will see them.

    Absolute link targets are taken relative to ``image_dir``; a ``..`` that would climb
    above the image root is refused rather than clamped, since such a link is a mistake
    or an attempt to reach the host.  Raises ``_Unresolvable`` with a reason.
    """
    todo = [p for p in path.split("/") if p]
    done: list[str] = []
    links = 0
    via = ""
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if not done:
                raise _Unresolvable(f"{via} escapes the image" if via
                                    else f"{path!r} climbs above the image root")
            done.pop()
            continue
        here = os.path.join(image_dir, *done, part)
        try:
            st = os.lstat(here)
        except OSError as e:
            raise _Unresolvable(f"'/{'/'.join([*done, part])}' does not exist in the image "
                                f"({os.strerror(e.errno or 0)})") from None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > max_links:
                raise _Unresolvable(f"{path!r}: too many levels of symbolic links")
            target = os.readlink(here)
            via = f"link '/{'/'.join([*done, part])}' -> {target!r}"
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p] + todo
            continue
        done.append(part)
    return "/" + "/".join(done)


def check_image(m: Manifest, fs_root: str = "/") -> None:
    """Check the image root exists and holds the command, workdir and mount points.

    ``fs_root`` is prepended to ``m.image_root`` (tests pass a temporary directory).
    Raises :class:`ManifestError` with code ``E_IMAGE``.
    """
    image = os.path.join(fs_root, m.image_root.lstrip("/"))
    problems: list[Problem] = []
    if not os.path.isdir(image):
        problems.append(Problem("image.root", f"{image!r} is not a directory",
                                "build or install the image first"))
        raise ManifestError("E_IMAGE", m.source, problems)
    mounts = [t.path for t in m.tmpfs] + ([m.data.path] if m.data else [])

    def under_mount(p: str, strict: bool) -> bool:
        return any(p.startswith(w + "/") or (not strict and p == w) for w in mounts)

    checks: list[tuple[str, str, str]] = [("service.command", m.service.command, "file")]
    if not under_mount(m.service.workdir, strict=False):
        checks.append(("service.workdir", m.service.workdir, "dir"))
    for i, t in enumerate(m.tmpfs):
        if not under_mount(t.path, strict=True):
            checks.append((f"writable[{i}].path", t.path, "dir"))
    if m.data and not under_mount(m.data.path, strict=True):
        checks.append((f"writable[{len(m.tmpfs)}].path", m.data.path, "dir"))
    for key, path, kind in checks:
        try:
            real = resolve_in_image(image, path)
        except _Unresolvable as e:
            problems.append(Problem(key, str(e)))
            continue
        try:
            st = os.stat(os.path.join(image, real.lstrip("/")))
        except OSError as e:
            problems.append(Problem(key, f"{real!r}: {os.strerror(e.errno or 0)}"))
            continue
        if kind == "dir" and not stat.S_ISDIR(st.st_mode):
            problems.append(Problem(key, f"{path!r} is not a directory in the image",
                                    "mount points must exist in the read-only image"))
        elif kind == "file" and not stat.S_ISREG(st.st_mode):
            problems.append(Problem(key, f"{path!r} is not a regular file in the image"))
        elif kind == "file" and not st.st_mode & 0o111:
            problems.append(Problem(key, f"{path!r} is not executable"))
    if problems:
        raise ManifestError("E_IMAGE", m.source, problems)
