"""Data dirs as size-bounded images: their sizes and whether the state file system can
hold them (pure; docs/data-dirs.md).

A service's data dir is an ext4 image ``<state_dir>/data/<service>.img`` (sparse),
loop-mounted by agentd at ``<run_dir>/cells/<cell>/data`` and bound into the cell: the
kernel's ext4 says ENOSPC when it is full, nothing polls.  The images share the state
file system with the journal, so admission keeps the journal's room: a cell is admitted
only if every image, filled to its size, still leaves ``data.state_reserve`` free.

:func:`data_size` is what a manifest's data dir gets; :func:`admit` is the space check,
fed with what the kernel adapter read (:class:`StateUsage`) and the sizes the agent's
cells hold now (a cell is admitted before its image exists, so the images alone would
let two admissions in a row both count the same free space).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.core import units
from agent.core.config import AgentConfig
from agent.core.errors import NotFoundError, RefusedError
from agent.core.manifest import Manifest

__all__ = ["IMAGE_SUFFIX", "ImageUse", "StateUsage", "admit", "admit_manifest", "data_size",
           "held_sizes", "is_reader", "planned_size"]

IMAGE_SUFFIX = ".img"


@dataclass(frozen=True)
class ImageUse:
    """One image on the state file system: its size and the bytes it takes now."""

    size: int
    allocated: int


@dataclass(frozen=True)
class StateUsage:
    """The state file system: bytes free to agentd (``f_bavail``), and the images."""

    avail: int
    images: Mapping[str, ImageUse] = field(default_factory=dict)


def is_reader(m: Manifest) -> bool:
    """The manifest mounts another service's data dir (read-only, if the policy shares it)."""
    return m.data is not None and m.data.source != m.name


def planned_size(m: Manifest, config: AgentConfig) -> int | None:
    """The size of the service's own data dir (None: it has none, or it only reads
    another's); what the planner plans for a cell admission let in."""
    if m.data is None or is_reader(m):
        return None
    return m.data.size if m.data.size is not None else config.data_default_size


def data_size(m: Manifest, config: AgentConfig) -> int | None:
    """:func:`planned_size`, refused (``E_DATA_SIZE``) above ``data.max_size``."""
    size = planned_size(m, config)
    if size is not None and size > config.data_max_size:
        raise RefusedError(
            "E_DATA_SIZE", f"{m.name}: writable data size {units.format_size(size)} is above "
            f"data.max_size {units.format_size(config.data_max_size)} in agentd.toml",
            "lower the data dir's size in the manifest, or raise data.max_size")
    return size


def held_sizes(manifests: Mapping[str, Manifest], config: AgentConfig) -> dict[str, int]:
    """service -> data size, for the cells the agent holds now (readers hold none)."""
    out: dict[str, int] = {}
    for name, m in manifests.items():
        size = planned_size(m, config)  # (admitted maybe under an older ceiling)
        if size is not None:
            out[name] = size
    return out


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def admit(name: str, size: int, usage: StateUsage, held: Mapping[str, int],
          reserve: int) -> int:
    """Refuse (``E_DATA_SPACE``) unless every image at its full size still leaves
    ``reserve`` bytes free; returns the bytes the images may still grow by.

    An image keeps its size when a manifest asks for less (ext4 images are not shrunk),
    and grows to the size asked when it is more.  ``held``: sizes of the cells admitted
    now (their images may not exist yet); ``name`` is the cell being admitted."""
    targets: dict[str, int] = {n: u.size for n, u in usage.images.items()}
    for n, s in {**held, name: size}.items():
        targets[n] = max(targets.get(n, 0), s)
    growth = sum(max(0, t - (usage.images[n].allocated if n in usage.images else 0))
                 for n, t in targets.items())
    room = usage.avail - reserve
    if growth > room:
        raise RefusedError(
            "E_DATA_SPACE", f"{name}: data images would fill the state file system: filled "
            f"to their sizes they need {_mib(growth)} more, {_mib(max(room, 0))} is free above "
            f"the journal's reserve ({_mib(reserve)} of {_mib(usage.avail)} free)",
            "lower the data dir's size in the manifest, remove the data image of a retired "
            "service (docs/data-dirs.md), or give the state file system more room")
    return room - growth


def admit_manifest(m: Manifest, config: AgentConfig, usage: StateUsage,
                   cells: Mapping[str, Manifest]) -> None:
    """Admission of ``m``'s data dir beside the ``cells`` the agent holds: its size
    within ``data.max_size`` (``E_DATA_SIZE``), a shared one existing (``E_DATA_SOURCE``),
    every image fitting beside the journal's reserve (``E_DATA_SPACE``)."""
    if m.data is None:
        return
    size = data_size(m, config)
    if size is None:
        if m.data.source not in usage.images:
            raise NotFoundError("E_DATA_SOURCE", f"{m.name}: service {m.data.source} has no "
                                "data dir yet", f"run {m.data.source} once first")
        return
    held = held_sizes({n: x for n, x in cells.items() if n != m.name}, config)
    admit(m.name, size, usage, held, config.data_state_reserve)
