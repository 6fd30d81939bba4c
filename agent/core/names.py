"""Names of cells and of the kernel objects the agent makes for them (pure).

A cell name is also a directory, cgroup and netns name, so it is checked once here;
every other name (veth ends, netns pins, files in the run dir) is derived from it.
"""

from __future__ import annotations

import hashlib
import re

from agent.core.errors import ConfigError

__all__ = ["CELL_NAME_RE", "HOSTS_FILE", "HOSTS_TARGET", "NETNS_PREFIX", "PEER_PREFIX",
           "VETH_PREFIX", "check_cell_name", "veth_names"]

CELL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
VETH_PREFIX = "vc-"  # host side of a cell's veth
PEER_PREFIX = "vp-"  # its peer, until it is moved into the cell's netns as eth0
NETNS_PREFIX = "cell-"  # a cell's pinned netns: <netns dir>/cell-<name>
HOSTS_FILE = "hosts"  # in the cell's run dir (PrepareDirs)
HOSTS_TARGET = "/etc/hosts"  # where it is bind-mounted read-only in the cell


def check_cell_name(cell: str) -> str:
    """A cell name is also a directory name: refuse anything that could escape."""
    if not CELL_NAME_RE.fullmatch(cell) or ".." in cell:
        raise ConfigError(
            "E_CELL_NAME",
            f"cell name {cell!r} is not valid",
            "use 1-63 characters from a-z, 0-9, '_', '.', '-', starting with a letter or digit",
        )
    return cell


def veth_names(cell: str) -> tuple[str, str]:
    """``(host side, temporary peer)`` names for a cell: ``vc-`` / ``vp-`` and
    12 hex digits of a hash of the cell name (15 characters, the kernel limit).
    The cell name itself is kept in the host side's alias."""
    digest = hashlib.blake2s(check_cell_name(cell).encode(), digest_size=6).hexdigest()
    return VETH_PREFIX + digest, PEER_PREFIX + digest
