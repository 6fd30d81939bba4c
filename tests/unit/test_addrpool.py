from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.addrpool import AddrPool, PoolConfig, PoolError
from agent.core.errors import ConfigError, NotFoundError, StateError


def small() -> PoolConfig:
    # 4 VLANs of /29: 8 addresses, .1 gateway, .2-.6 for cells (5 cells)
    return PoolConfig.make("10.9.0.0/27", subnet_prefix=29, vlan_min=10, vlan_max=13)


def test_default_layout() -> None:
    cfg = PoolConfig.make()
    assert cfg.subnet(100) == IPv4Network("10.77.0.0/24")
    assert cfg.subnet(101) == IPv4Network("10.77.1.0/24")
    assert cfg.subnet(355) == IPv4Network("10.77.255.0/24")
    assert cfg.gateway(100) == IPv4Interface("10.77.0.1/24")
    pool = AddrPool(cfg)
    a = pool.allocate("a")
    b = pool.allocate("b", vlan=a.vlan)
    c = pool.allocate("c")
    assert (a.vlan, a.address, a.gateway) == (100, IPv4Interface("10.77.0.2/24"),
                                              IPv4Address("10.77.0.1"))
    assert (b.vlan, b.address) == (100, IPv4Interface("10.77.0.3/24"))
    assert (c.vlan, c.address) == (101, IPv4Interface("10.77.1.2/24"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"network": "10.77.0.1/16"},
        {"network": "nonsense"},
        {"subnet_prefix": 31},
        {"subnet_prefix": 8},
        {"vlan_min": 0},
        {"vlan_min": 200, "vlan_max": 100},
        {"vlan_max": 4095},
        {"vlan_min": 100, "vlan_max": 400},  # 301 VLANs, only 256 /24 in a /16
    ],
)
def test_bad_config(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PoolConfig.make(**kwargs)  # type: ignore[arg-type]


def test_exhaustion_codes() -> None:
    pool = AddrPool(small())
    for i in range(5):
        assert pool.allocate(f"c{i}", vlan=10).address.ip == IPv4Address(f"10.9.0.{2 + i}")
    with pytest.raises(PoolError) as e:
        pool.allocate("c5", vlan=10)
    assert e.value.code == "E_POOL_ADDRS_EXHAUSTED"
    for v in (11, 12, 13):
        pool.allocate(f"v{v}")
    with pytest.raises(PoolError) as e:
        pool.allocate("more")
    assert e.value.code == "E_POOL_VLANS_EXHAUSTED"
    with pytest.raises(PoolError) as e:
        pool.allocate("x", vlan=14)
    assert e.value.code == "E_POOL_VLAN_RANGE"
    with pytest.raises(PoolError) as e:
        pool.allocate("c0", vlan=11)
    assert e.value.code == "E_POOL_DUPLICATE"
    with pytest.raises(NotFoundError):
        pool.release("nobody")


def test_release_frees_vlan_and_lowest_address_is_reused() -> None:
    pool = AddrPool(small())
    pool.allocate("a", 10)
    pool.allocate("b", 10)
    pool.allocate("c", 10)
    pool.release("b")
    assert pool.allocate("d", 10).address.ip == IPv4Address("10.9.0.3")
    pool.release("a")
    pool.release("c")
    pool.release("d")
    assert pool.vlans_in_use() == frozenset()
    assert pool.free_vlan() == 10


def test_restore_rejects_corrupt_snapshots() -> None:
    cfg = small()
    pool = AddrPool(cfg)
    pool.allocate("a", 10)
    good = pool.snapshot()
    assert AddrPool.restore(cfg, good).snapshot() == good
    bads = [
        {**good, "version": 99},
        {**good, "network": "10.8.0.0/27"},
        {**good, "leases": "x"},
        {**good, "leases": [["a", 10]]},
        {**good, "leases": [["a", 10, "10.9.0.1"]]},  # the gateway
        {**good, "leases": [["a", 10, "10.9.0.7"]]},  # broadcast
        {**good, "leases": [["a", 11, "10.9.0.2"]]},  # address of VLAN 10
        {**good, "leases": [["a", 99, "10.9.0.2"]]},
        {**good, "leases": [["a", 10, "10.9.0.2"], ["b", 10, "10.9.0.2"]]},
        {**good, "leases": [["a", 10, "10.9.0.2"], ["a", 10, "10.9.0.3"]]},
        {**good, "leases": [["a", 10, "300.1.1.1"]]},
    ]
    for bad in bads:
        with pytest.raises(StateError):
            AddrPool.restore(cfg, bad)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, 9), st.sampled_from([None, 10, 11, 12, 13])),
        st.tuples(st.just("release"), st.integers(0, 9), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(ops)
def test_model(seq: list[tuple[str, int, int | None]]) -> None:
    """Against a trivially correct model: no address handed out twice, releases
    return exactly what was allocated, failures leave state unchanged, and
    snapshot/restore round-trips at every step."""
    cfg = small()
    pool = AddrPool(cfg)
    model: dict[str, tuple[int, IPv4Interface]] = {}
    for op, n, vlan in seq:
        cell = f"cell{n}"
        before = pool.snapshot()
        if op == "alloc":
            try:
                lease = pool.allocate(cell, vlan)
            except PoolError as exc:
                assert pool.snapshot() == before
                if exc.code == "E_POOL_DUPLICATE":
                    assert cell in model
                elif exc.code == "E_POOL_ADDRS_EXHAUSTED":
                    assert sum(1 for v, _ in model.values() if v == vlan) == 5
                else:
                    assert exc.code == "E_POOL_VLANS_EXHAUSTED" and vlan is None
                    assert {v for v, _ in model.values()} == {10, 11, 12, 13}
                continue
            assert cell not in model
            assert lease.address not in {a for _, a in model.values()}
            assert lease.address.ip in cfg.subnet(lease.vlan)
            assert lease.address.ip != lease.gateway
            if vlan is None:
                assert lease.vlan not in {v for v, _ in model.values()}
            model[cell] = (lease.vlan, lease.address)
        else:
            if cell not in model:
                with pytest.raises(NotFoundError):
                    pool.release(cell)
                assert pool.snapshot() == before
                continue
            got = pool.release(cell)
            assert (got.vlan, got.address) == model.pop(cell)
        assert {x.cell: (x.vlan, x.address) for x in pool.leases()} == model
        assert pool.vlans_in_use() == frozenset(v for v, _ in model.values())
        assert AddrPool.restore(cfg, pool.snapshot()).snapshot() == pool.snapshot()
