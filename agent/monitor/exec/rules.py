"""Channel 1's exec verdict (pure): may this file run in this cell?

The kernel asks before every exec through a cell's mounts (fanotify
``FAN_OPEN_EXEC_PERM``: the program, a script with a ``#!`` line, the interpreter it
names, the ELF interpreter of a dynamic program).  The service observes the very file
the kernel is about to run (:class:`Observed`: its path as the cell sees it, its
SHA-256, size and permission bits, and whether it lies on the cell's image) and
:func:`decide` answers from three inputs only:

1. the signature database: a file whose hash is listed is refused (``signature``),
   sealed or not;
2. the image's seal (:class:`agent.core.seal.Seal`; None: an unsealed image a
   development box lets run, checked against signatures only);
3. the observation: a file that is not on the image's file system (a writable area, a
   data dir, another cell's mount) or whose path the seal does not list is ``unsealed``;
   a listed path whose content, size, mode or kind differs from the seal is ``changed``;
   a memory file (``/memfd:...``, should a kernel ever report one) is ``memfd``.

Everything else runs.  Same inputs, same verdict: the tests go through every case.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from agent.core.manifest import Manifest
from agent.core.seal import Seal, check_path

__all__ = ["ALLOW", "REASONS", "Observed", "Reason", "Verdict", "decide", "seal_path_of",
           "seal_relpath"]

Reason = Literal["unsealed", "changed", "signature", "memfd", "error"]
REASONS: tuple[Reason, ...] = ("unsealed", "changed", "signature", "memfd", "error")

SEAL_SUFFIX = ".seal"
_DELETED = " (deleted)"


@dataclass(frozen=True)
class Observed:
    """The file the kernel is about to execute, as the service saw it."""

    path: str  # as the cell sees it: what the kernel's d_path says of the opened file
    digest: str  # SHA-256, hex
    size: int
    mode: int  # permission bits (S_IMODE)
    on_image: bool  # on the cell's image file system, and the process is the cell's


@dataclass(frozen=True)
class Verdict:
    allow: bool
    reason: Reason | None = None
    signature: str | None = None  # the signature's name, for reason "signature"


ALLOW = Verdict(True)


def seal_relpath(path: str) -> str | None:
    """The seal's key for an absolute in-cell path (``/bin/sh`` -> ``bin/sh``); None for
    a path no seal can list (relative, a deleted file, ``..``, control characters)."""
    if not path.startswith("/") or path.endswith(_DELETED):
        return None
    try:
        return check_path(path[1:])
    except ValueError:
        return None


def seal_path_of(m: Manifest) -> str:
    """Where the seal of ``m``'s image is: the manifest's ``[image] seal``, or the image
    directory's name with ``.seal`` appended, beside it
    (``/usr/share/agent/images/demo`` -> ``/usr/share/agent/images/demo.seal``)."""
    return m.image_seal or m.image_root.rstrip("/") + SEAL_SUFFIX


def decide(obs: Observed, seal: Seal | None, signatures: Mapping[str, str]) -> Verdict:
    """The verdict for ``obs`` (see the module doc for the order of the checks)."""
    name = signatures.get(obs.digest)
    if name is not None:
        return Verdict(False, "signature", name)
    if obs.path.startswith("/memfd:"):
        return Verdict(False, "memfd")
    if seal is None:
        return ALLOW
    rel = seal_relpath(obs.path)
    entry = seal.get(rel) if rel is not None and obs.on_image else None
    if entry is None:
        return Verdict(False, "unsealed")
    if entry.kind != "f" or (entry.digest, entry.size, entry.mode) != (obs.digest, obs.size,
                                                                       obs.mode):
        return Verdict(False, "changed")
    return ALLOW
