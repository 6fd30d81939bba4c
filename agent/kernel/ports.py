"""A cell's port on the bridge, up or down: the ``isolate`` response (issue 11).

Setting the host side of the cell's veth down cuts the cell off its VLAN at once, in
both directions, without touching its namespaces, tables or processes; setting it up
again restores it.  By name (``vc-<hash>``, :func:`agent.core.names.veth_names`); a cell
without a link has nothing to isolate.
"""

from __future__ import annotations

from typing import Any

from pyroute2 import IPRoute

from agent.core.names import veth_names
from agent.kernel.netlink import index, nl

__all__ = ["set_cell_port"]


def set_cell_port(cell: str, up: bool, ipr: Any | None = None) -> bool:
    """Set ``cell``'s bridge port up or down; False if the cell has no port."""
    host, _peer = veth_names(cell)
    own = ipr is None
    handle = IPRoute() if ipr is None else ipr
    try:
        idx = index(handle, host)
        if idx is None:
            return False
        with nl("link set", f"veth {host} {'up' if up else 'down'}"):
            handle.link("set", index=idx, state="up" if up else "down")
        return True
    finally:
        if own:
            handle.close()
