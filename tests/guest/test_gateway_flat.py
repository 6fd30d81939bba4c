"""The VLAN gateway step costs the same with 60 more links on the host (functional: it
counts netlink requests and the messages they return, never time).

``HostNet.ensure_gateway`` used to dump every link of the host to learn whether the
VLAN's gateway existed, so each cell's start grew with the number of cells (two links
each).  It now looks the gateway up by name.  The control: a dump through the same
counting handle does grow with the links, so the counter would see one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pyroute2 import IPRoute

from agent.kernel import bridge as kbr
from agent.kernel.net import HostNet

BRIDGE, VLAN, GW = "agtgbr0", 330, "10.81.0.1/24"


class Counting:
    """An IPRoute that records each request (method, first argument) and counts the
    messages (or indices) it returned."""

    def __init__(self, ipr: Any) -> None:
        self.ipr = ipr
        self.calls: list[tuple[str, Any]] = []
        self.msgs = 0

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.ipr, name)
        if not callable(fn):
            return fn

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args[0] if args else None))
            out = fn(*args, **kwargs)
            if out is not None and not isinstance(out, (int, str, bytes)):
                out = list(out)
                self.msgs += len(out)
            return out

        return call


@pytest.fixture
def hostnet() -> Iterator[tuple[HostNet, list[Counting]]]:
    seen: list[Counting] = []

    @contextmanager
    def counted() -> Iterator[Any]:
        ipr = IPRoute()
        try:
            seen.append(Counting(ipr))
            yield seen[-1]
        finally:
            ipr.close()

    hn = HostNet(BRIDGE)
    hn._ipr = counted  # type: ignore[method-assign]
    with IPRoute() as ipr:
        kbr.ensure_bridge(ipr, BRIDGE)
    try:
        yield hn, seen
    finally:
        with IPRoute() as ipr:
            for i in range(30):
                for name in (f"agtgv{i}", f"agtgp{i}"):
                    if ipr.link_lookup(ifname=name):
                        ipr.link("del", ifname=name)
            kbr.remove_vlan_gateway(ipr, BRIDGE, VLAN)
            kbr.delete_bridge(ipr, BRIDGE)


def cost(seen: list[Counting], step: Callable[[], Any]) -> tuple[Any, list[tuple[str, Any]], int]:
    seen.clear()
    out = step()
    return (out, [c for h in seen for c in h.calls], sum(h.msgs for h in seen))


def test_gateway_lookup_is_flat_in_the_number_of_links(
        hostnet: tuple[HostNet, list[Counting]]) -> None:
    hn, seen = hostnet
    made0, calls0, msgs0 = cost(seen, lambda: hn.ensure_gateway(VLAN, GW))
    again0, calls0b, msgs0b = cost(seen, lambda: hn.ensure_gateway(VLAN, GW))
    dump0 = cost(seen, lambda: hn.gateway_vlans())
    hn.remove_gateway(VLAN)
    assert (made0, again0) == (True, False)  # undo removes only what it made
    assert dump0[0] == {VLAN}

    with IPRoute() as ipr:  # 30 cells' worth of links (a veth pair each)
        for i in range(30):
            ipr.link("add", ifname=f"agtgv{i}", kind="veth", peer=f"agtgp{i}")
    made1, calls1, msgs1 = cost(seen, lambda: hn.ensure_gateway(VLAN, GW))
    again1, calls1b, msgs1b = cost(seen, lambda: hn.ensure_gateway(VLAN, GW))
    dump1 = cost(seen, lambda: hn.gateway_vlans())

    assert (made1, again1) == (True, False)
    assert (calls1, msgs1) == (calls0, msgs0)  # same requests, same replies
    assert (calls1b, msgs1b) == (calls0b, msgs0b)
    assert not any(arg == "dump" or name.startswith("get_") for name, arg in calls1 + calls1b)
    # the control: a dump is seen by the counter, and grows with the links
    assert any(arg == "dump" for _, arg in dump1[1])
    assert dump1[2] >= dump0[2] + 60
