"""VLAN and address allocation for cells (pure: no I/O).

Every VLAN in ``[vlan_min, vlan_max]`` owns one subnet of the pool, chosen by
position: VLAN ``vlan_min + i`` gets the ``i``-th subnet of ``network`` with
prefix ``subnet_prefix``.  So with the defaults VLAN 100 is ``10.77.0.0/24``,
VLAN 101 is ``10.77.1.0/24``, and so on.  The mapping is fixed by the
configuration, not by allocation order, so an address always says which VLAN
it is on and a restart cannot shuffle anything.

In each subnet the first host address (``.1``) is the host-side gateway of the
VLAN; cells get the lowest free address from ``.2`` up to the last host
address.  A VLAN is *in use* while at least one cell holds a lease on it.

The pool is a small mutable object with an explicit :meth:`AddrPool.snapshot`
(a CBOR-friendly dict) and :meth:`AddrPool.restore` for the journal.  Every
operation either succeeds completely or raises and leaves the pool unchanged.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from agent.core.errors import ConfigError, NotFoundError, RefusedError, StateError

__all__ = [
    "AddrPool",
    "Lease",
    "PoolConfig",
    "PoolError",
]

VLAN_ID_MIN = 1
VLAN_ID_MAX = 4094
SNAPSHOT_VERSION = 1


class PoolError(RefusedError):
    """An allocation was refused: codes ``E_POOL_VLANS_EXHAUSTED``,
    ``E_POOL_ADDRS_EXHAUSTED``, ``E_POOL_VLAN_RANGE``, ``E_POOL_DUPLICATE``."""


@dataclass(frozen=True)
class PoolConfig:
    """Validated pool configuration; build it with :meth:`PoolConfig.make`."""

    network: IPv4Network
    subnet_prefix: int
    vlan_min: int
    vlan_max: int

    @classmethod
    def make(
        cls,
        network: str = "10.77.0.0/16",
        subnet_prefix: int = 24,
        vlan_min: int = 100,
        vlan_max: int = 355,
    ) -> PoolConfig:
        try:
            net = IPv4Network(network, strict=True)
        except ValueError as exc:
            raise ConfigError(
                "E_CONFIG", f"network.pool `{network}`: {exc}", "use a CIDR such as 10.77.0.0/16"
            ) from None
        if not net.prefixlen <= subnet_prefix <= 30:
            raise ConfigError(
                "E_CONFIG",
                f"network.subnet_prefix {subnet_prefix} must be between "
                f"{net.prefixlen} and 30",
                "a /24 per VLAN is the usual choice",
            )
        if not VLAN_ID_MIN <= vlan_min <= vlan_max <= VLAN_ID_MAX:
            raise ConfigError(
                "E_CONFIG",
                f"network.vlans {vlan_min}-{vlan_max} is not a range inside "
                f"{VLAN_ID_MIN}-{VLAN_ID_MAX}",
                "VLAN 1 is the bridge default; start at 2 or above",
            )
        n_subnets = 1 << (subnet_prefix - net.prefixlen)
        n_vlans = vlan_max - vlan_min + 1
        if n_vlans > n_subnets:
            raise ConfigError(
                "E_CONFIG",
                f"network.vlans {vlan_min}-{vlan_max} ({n_vlans} VLANs) needs more "
                f"/{subnet_prefix} subnets than {net} has ({n_subnets})",
                f"shrink the VLAN range to {n_subnets} or widen the pool",
            )
        return cls(net, subnet_prefix, vlan_min, vlan_max)

    def check_vlan(self, vlan: int) -> None:
        if not self.vlan_min <= vlan <= self.vlan_max:
            raise PoolError(
                "E_POOL_VLAN_RANGE",
                f"VLAN {vlan} is outside the agent's range {self.vlan_min}-{self.vlan_max}",
                "pick a VLAN inside network.vlans or widen the range",
            )

    def subnet(self, vlan: int) -> IPv4Network:
        """The subnet owned by ``vlan``."""
        self.check_vlan(vlan)
        size = 1 << (32 - self.subnet_prefix)
        base = int(self.network.network_address) + (vlan - self.vlan_min) * size
        return IPv4Network((base, self.subnet_prefix))

    def gateway(self, vlan: int) -> IPv4Interface:
        """The host-side gateway address of ``vlan`` with its prefix (``.1/24``)."""
        net = self.subnet(vlan)
        return IPv4Interface((int(net.network_address) + 1, net.prefixlen))

    def host_range(self, vlan: int) -> range:
        """Integer addresses that cells may get on ``vlan`` (``.2`` to last host)."""
        net = self.subnet(vlan)
        return range(int(net.network_address) + 2, int(net.broadcast_address))


@dataclass(frozen=True)
class Lease:
    """What a cell holds: its VLAN, its address (with prefix) and its gateway."""

    cell: str
    vlan: int
    address: IPv4Interface
    gateway: IPv4Address

    def to_wire(self) -> dict[str, Any]:
        return {"cell": self.cell, "vlan": self.vlan, "address": str(self.address)}


class AddrPool:
    """Allocation state.  ``allocate`` and ``release`` are exact inverses."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self._leases: dict[str, Lease] = {}
        # vlan -> set of integer addresses in use on it
        self._used: dict[int, set[int]] = {}

    # -- queries -------------------------------------------------------------

    def lease(self, cell: str) -> Lease | None:
        return self._leases.get(cell)

    def leases(self) -> list[Lease]:
        return sorted(self._leases.values(), key=lambda x: (x.vlan, int(x.address.ip)))

    def vlans_in_use(self) -> frozenset[int]:
        return frozenset(self._used)

    def free_vlan(self) -> int:
        """The lowest VLAN no cell uses; ``E_POOL_VLANS_EXHAUSTED`` if none."""
        for vlan in range(self.config.vlan_min, self.config.vlan_max + 1):
            if vlan not in self._used:
                return vlan
        raise PoolError(
            "E_POOL_VLANS_EXHAUSTED",
            f"all {self.config.vlan_max - self.config.vlan_min + 1} VLANs "
            f"{self.config.vlan_min}-{self.config.vlan_max} are in use",
            "stop a cell or widen network.vlans",
        )

    # -- changes -------------------------------------------------------------

    def allocate(self, cell: str, vlan: int | None = None) -> Lease:
        """Give ``cell`` the lowest free address on ``vlan``.

        With ``vlan=None`` the cell gets a VLAN of its own (the lowest unused
        one).  A cell holds at most one lease.
        """
        if cell in self._leases:
            held = self._leases[cell]
            raise PoolError(
                "E_POOL_DUPLICATE",
                f"cell `{cell}` already holds {held.address} on VLAN {held.vlan}",
                "release the old lease first",
            )
        if vlan is None:
            vlan = self.free_vlan()
        self.config.check_vlan(vlan)
        used = self._used.get(vlan, set())
        for candidate in self.config.host_range(vlan):
            if candidate not in used:
                break
        else:
            raise PoolError(
                "E_POOL_ADDRS_EXHAUSTED",
                f"VLAN {vlan} ({self.config.subnet(vlan)}) has no free address",
                "put the cell on another VLAN or use a shorter subnet_prefix",
            )
        lease = Lease(
            cell,
            vlan,
            IPv4Interface((candidate, self.config.subnet_prefix)),
            self.config.gateway(vlan).ip,
        )
        self._used.setdefault(vlan, set()).add(candidate)
        self._leases[cell] = lease
        return lease

    def release(self, cell: str) -> Lease:
        """Return the cell's lease to the pool and give it back to the caller."""
        lease = self._leases.pop(cell, None)
        if lease is None:
            raise NotFoundError("E_NOT_FOUND", f"cell `{cell}` holds no address lease")
        used = self._used[lease.vlan]
        used.discard(int(lease.address.ip))
        if not used:
            del self._used[lease.vlan]
        return lease

    # -- journal -------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """CBOR-friendly state; :meth:`restore` with the same config rebuilds it."""
        return {
            "version": SNAPSHOT_VERSION,
            "network": str(self.config.network),
            "subnet_prefix": self.config.subnet_prefix,
            "leases": [[x.cell, x.vlan, str(x.address.ip)] for x in self.leases()],
        }

    @classmethod
    def restore(cls, config: PoolConfig, snap: dict[str, Any]) -> AddrPool:
        """Rebuild a pool from :meth:`snapshot`, checking every lease again."""

        def bad(what: str) -> StateError:
            return StateError(
                "E_POOL_SNAPSHOT",
                f"address pool snapshot: {what}",
                "the journal does not match the current network configuration",
            )

        if not isinstance(snap, dict) or snap.get("version") != SNAPSHOT_VERSION:
            raise bad("unknown version")
        if (
            snap.get("network") != str(config.network)
            or snap.get("subnet_prefix") != config.subnet_prefix
        ):
            raise bad(f"was taken for {snap.get('network')}/{snap.get('subnet_prefix')}")
        pool = cls(config)
        leases = snap.get("leases")
        if not isinstance(leases, list):
            raise bad("leases is not a list")
        for item in leases:
            if (
                not isinstance(item, list)
                or len(item) != 3
                or not isinstance(item[0], str)
                or not isinstance(item[1], int)
                or not isinstance(item[2], str)
            ):
                raise bad(f"malformed lease {item!r}")
            cell, vlan, addr_s = item
            try:
                addr = IPv4Address(addr_s)
            except ipaddress.AddressValueError:
                raise bad(f"bad address {addr_s!r}") from None
            try:
                hosts = config.host_range(vlan)
            except PoolError:
                raise bad(f"VLAN {vlan} of `{cell}` is outside the range") from None
            if int(addr) not in hosts:
                raise bad(f"{addr} of `{cell}` is not a cell address of VLAN {vlan}")
            used = pool._used.setdefault(vlan, set())
            if cell in pool._leases or int(addr) in used:
                raise bad(f"duplicate lease for `{cell}` or {addr}")
            used.add(int(addr))
            pool._leases[cell] = Lease(
                cell, vlan, IPv4Interface((int(addr), config.subnet_prefix)),
                config.gateway(vlan).ip,
            )
        return pool
