"""Names of cells and of the kernel objects the agent makes for them (pure).

A cell name is also a directory, cgroup and netns name, so it is checked once here;
every other name (veth ends, netns pins, files in the run dir) is derived from it.
"""

from __future__ import annotations

import hashlib
import re

from agent.core.errors import ConfigError

__all__ = ["CELL_NAME_RE", "HOSTS_FILE", "HOSTS_TARGET", "NETNS_PREFIX", "PEER_PREFIX",
           "VETH_PREFIX", "cell_link_local", "cell_mac", "check_cell_name", "veth_names"]

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


def cell_mac(cell: str) -> str:
    """The MAC address of the cell's ``eth0``: locally administered, unicast, from a hash
    of the cell name.  The agent sets it when it wires the cell, so the bridge's layer-2
    rules (agent.core.l2fw) can pin the cell's frames to it."""
    digest = hashlib.blake2s(b"agent-mac:" + check_cell_name(cell).encode(),
                             digest_size=5).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest))


def cell_link_local(cell: str) -> str:
    """The IPv6 link-local address the kernel gives the cell's ``eth0``: modified EUI-64
    of :func:`cell_mac` (RFC 4291 appendix A; the kernel's default ``addr_gen_mode``,
    which every new netns starts with)."""
    b = bytes(int(x, 16) for x in cell_mac(cell).split(":"))
    eui = bytes((b[0] ^ 0x02, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]))
    groups = [f"{eui[i] << 8 | eui[i + 1]:x}" for i in range(0, 8, 2)]
    return "fe80::" + ":".join(groups)
