"""How cgroup v2's limits map onto the legacy v1 files (pure): weights and quotas as
systemd converts them, the files in a safe writing order, what v1 cannot enforce, and the
cell of a process from its v1 ``/proc/PID/cgroup`` (docs/cgroup-v1.md).
"""

from __future__ import annotations

from agent.core.cgroup import Limits

__all__ = ["bfq_weight", "blkio_weight", "cell_from_proc_cgroup_v1", "cfs_quota_us", "cpu_shares",
           "degraded_limits", "v1_files"]


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def cpu_shares(weight: int) -> int:
    """v2 ``cpu.weight`` (1..10000, default 100) -> v1 ``cpu.shares`` (default 1024).

    systemd's mapping: ``weight * 1024 / 100`` clamped to 2..262144.
    """
    return _clamp(weight * 1024 // 100, 2, 262144)


def blkio_weight(io_weight: int) -> int:
    """v2 ``io.weight`` (default 100) -> ``blkio.weight`` 10..1000 (default 500), as systemd."""
    return _clamp(io_weight * 500 // 100, 10, 1000)


def bfq_weight(io_weight: int) -> int:
    """v2 ``io.weight`` -> ``blkio.bfq.weight`` 1..1000 (default 100, same scale)."""
    return _clamp(io_weight, 1, 1000)


def cfs_quota_us(limits: Limits) -> int:
    """``cpu.cfs_quota_us``: -1 (no cap) or millicores * period / 1000, as ``cpu.max``."""
    if limits.cpu_max_millicores is None:
        return -1
    return int(limits.cpu_max_line().split()[0])


def v1_files(limits: Limits, *, io_file: str | None = None,
             memsw: bool = False) -> list[tuple[str, str, str]]:
    """``(controller, file, value)`` triples in a safe writing order.

    ``memory_min`` has no v1 file.  With swap accounting (``memsw``) the
    memory+swap limit is lifted first, so a raised ``limit_in_bytes`` never
    exceeds it (EINVAL) and swap stays unlimited as with v2's default.
    """

    def num(v: int | None) -> str:
        return "-1" if v is None else str(v)

    out = [
        ("cpu", "cpu.cfs_period_us", str(limits.cpu_period_us)),
        ("cpu", "cpu.cfs_quota_us", str(cfs_quota_us(limits))),
        ("cpu", "cpu.shares", str(cpu_shares(limits.cpu_weight))),
    ]
    if memsw:
        out.append(("memory", "memory.memsw.limit_in_bytes", "-1"))
    out += [
        ("memory", "memory.soft_limit_in_bytes", num(limits.memory_high)),
        ("memory", "memory.limit_in_bytes", num(limits.memory_max)),
        ("pids", "pids.max", "max" if limits.pids_max is None else str(limits.pids_max)),
    ]
    if io_file == "blkio.weight":
        out.append(("blkio", io_file, str(blkio_weight(limits.io_weight))))
    elif io_file == "blkio.bfq.weight":
        out.append(("blkio", io_file, str(bfq_weight(limits.io_weight))))
    return out


def degraded_limits(limits: Limits, features: frozenset[str]) -> dict[str, str]:
    """The limits that a backend with ``features`` does not enforce as v2 would."""
    out: dict[str, str] = {}
    if limits.memory_min and "memory.min" not in features:
        out["memory_min"] = "recorded, not enforced: no memory protection on cgroup v1"
    if limits.memory_high is not None and "memory.high" not in features:
        out["memory_high"] = ("soft limit only: reclaimed down to it under global memory "
                              "pressure, never throttled")
    if limits.io_weight != 100 and "io.weight" not in features:
        out["io_weight"] = "ignored: no blkio weight file on this kernel"
    return out


def cell_from_proc_cgroup_v1(text: str, prefix: str, controller: str = "memory") -> str | None:
    """The cell of a process from ``/proc/PID/cgroup`` on v1: the ``controller`` line."""
    prefix = prefix.rstrip("/") + "/"
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and controller in parts[1].split(","):
            path = parts[2]
            if path.startswith(prefix):
                return path[len(prefix):].split("/", 1)[0] or None
            return None
    return None
