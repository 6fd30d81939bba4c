from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.budget import (
    AdmissionRefused,
    Amount,
    Budget,
    HostPressure,
    Request,
    Thresholds,
    check_pressure,
    default_reserve,
    parse_cpu_list,
    parse_meminfo_total,
)
from agent.core.cgroup import Pressure, parse_pressure
from agent.core.errors import ConfigError, KernelError, NotFoundError, StateError
from agent.core.manifest import Manifest, ManifestError, manifest_from_dict
from agent.kernel.host import read_capacity, read_host_pressure
from agent.kernel.image import check_image

CAP = Amount(cpu=4000, memory=1 << 30, pids=4096)
RSV = Amount(cpu=200, memory=64 << 20, pids=256)
CALM = "some avg10=1.00 avg60=0.50 avg300=0.10 total=100\nfull avg10=0.00 avg60=0.00 " \
       "avg300=0.00 total=0\n"


def req(cell: str, cpu: int = 0, mem: int = 0, pids: int = 0) -> Request:
    return Request(cell, Amount(cpu, mem, pids))


def test_admit_and_release() -> None:
    b0 = Budget.new(CAP, RSV)
    b1 = b0.admit(req("a", 1000, 100 << 20, 64))
    assert b0.committed == Amount()
    assert b1.committed == Amount(1000, 100 << 20, 64)
    assert b1.free == Amount(2800, (1 << 30) - (64 << 20) - (100 << 20), 4096 - 256 - 64)
    assert b1.release("a") == b0


@pytest.mark.parametrize(("request_", "code", "numbers"), [
    (req("x", cpu=3000), "E_ADMISSION_CPU",
     "requested 3, committed 1 of 3800m available (capacity 4 - host reserve 200m); free 2800m"),
    (req("x", mem=900 << 20), "E_ADMISSION_MEMORY",
     "requested 900.0 MiB, committed 100.0 MiB of 960.0 MiB available (capacity 1024.0 MiB"
     " - host reserve 64.0 MiB); free 860.0 MiB"),
    (req("x", pids=3800), "E_ADMISSION_PIDS",
     "requested 3800, committed 64 of 3840 available (capacity 4096 - host reserve 256); "
     "free 3776"),
])
def test_refusals_carry_numbers(request_: Request, code: str, numbers: str) -> None:
    b = Budget.new(CAP, RSV).admit(req("a", 1000, 100 << 20, 64))
    with pytest.raises(AdmissionRefused) as ei:
        b.admit(request_)
    e = ei.value
    assert e.code == code
    assert e.message == f"cell x: {code.split('_')[-1].lower()}: {numbers}"
    wire = e.to_wire()
    assert wire["details"]["requested"] == getattr(request_.amount, wire["details"]["resource"])
    assert wire["details"]["capacity"] == getattr(CAP, wire["details"]["resource"])


def test_exactly_full_is_admitted() -> None:
    b = Budget.new(CAP, RSV)
    b = b.admit(Request("a", b.available))
    assert b.free == Amount()
    assert b.admit(req("zero")).free == Amount()
    with pytest.raises(AdmissionRefused):
        b.admit(req("b", cpu=1))


def test_duplicate_and_unknown() -> None:
    b = Budget.new(CAP, RSV).admit(req("a"))
    with pytest.raises(StateError) as e1:
        b.admit(req("a"))
    assert e1.value.code == "E_ADMISSION_EXISTS"
    with pytest.raises(NotFoundError) as e2:
        b.release("b")
    assert e2.value.code == "E_ADMISSION_UNKNOWN"


def test_replace_is_all_or_nothing() -> None:
    b = Budget.new(CAP, RSV).admit(req("a", cpu=1000)).admit(req("b", cpu=2000))
    assert b.replace(req("a", cpu=1800)).get("a") == Amount(1800, 0, 0)
    with pytest.raises(AdmissionRefused):
        b.replace(req("a", cpu=1801))
    assert b.get("a") == Amount(1000, 0, 0)


def test_reserve_must_fit() -> None:
    with pytest.raises(ConfigError) as ei:
        Budget.new(CAP, Amount(5000, 0, 0))
    assert ei.value.code == "E_ADMISSION_RESERVE"


def test_default_reserve_fits() -> None:
    for cap in (CAP, Amount(1000, 128 << 20, 1024), Amount(0, 0, 0)):
        Budget.new(cap, default_reserve(cap))
    assert default_reserve(CAP) == Amount(400, 128 << 20, 512)


def test_request_from_manifest() -> None:
    m = manifest_from_dict({"name": "w", "service": {"command": "/x"}, "image": {"root": "/i"},
                            "resources": {"cpu_min": "0.25", "memory_min": "16M",
                                          "pids_max": 20}})
    assert Request.from_manifest(m) == Request("w", Amount(250, 16 << 20, 20))
    assert Request.from_manifest(m, "w-2").cell == "w-2"


ops = st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.integers(0, 2000),
                         st.integers(0, 400 << 20), st.integers(0, 2000)), max_size=40)


@given(ops)
def test_property_committed_never_exceeds_available(seq: list[tuple[bool, int, int, int, int]],
                                                    ) -> None:
    b = Budget.new(CAP, RSV)
    for admit, n, cpu, mem, pids in seq:
        cell = f"c{n}"
        before = b
        if admit:
            try:
                b = b.admit(req(cell, cpu, mem, pids))
            except (AdmissionRefused, StateError):
                assert b is before
                continue
            assert b.release(cell) == before  # release restores exactly
        elif b.get(cell) is not None:
            b = b.release(cell)
            assert b.get(cell) is None
        assert b.committed.fits_in(b.available)
        assert b.committed == sum((a for _, a in b.cells), Amount())


# ---- pressure


def pressure(mem: float = 0.0, cpu: float = 0.0, io: float = 0.0) -> HostPressure:
    def p(v: float) -> Pressure:
        return parse_pressure(f"some avg10={v:.2f} avg60=0.00 avg300=0.00 total=1\n")
    return HostPressure(cpu=p(cpu), memory=p(mem), io=p(io))


@pytest.mark.parametrize(("hp", "t", "fragment"), [
    (pressure(mem=40.5), Thresholds(), "memory pressure: some avg10 40.50% is above the "
                                       "threshold of 40%"),
    (pressure(cpu=90.0), Thresholds(), "cpu pressure: some avg10 90.00%"),
    (pressure(io=50.0), Thresholds(io_some_avg10=20.0), "io pressure: some avg10 50.00%"),
])
def test_pressure_refuses(hp: HostPressure, t: Thresholds, fragment: str) -> None:
    with pytest.raises(AdmissionRefused) as ei:
        Budget.new(CAP, RSV).admit(req("a"), hp, t)
    assert ei.value.code == "E_ADMISSION_PRESSURE"
    assert fragment in ei.value.message


def test_pressure_at_threshold_and_missing_psi_admits() -> None:
    check_pressure(pressure(mem=40.0, cpu=80.0, io=99.0), Thresholds())
    check_pressure(HostPressure(), Thresholds())


def fake_proc(root: Path, psi: bool = True) -> None:
    (root / "sys/kernel").mkdir(parents=True)
    (root / "meminfo").write_text("MemTotal:        2041234 kB\nMemFree:  100 kB\n")
    (root / "sys/kernel/pid_max").write_text("32768\n")
    (root / "sys/kernel/threads-max").write_text("15000\n")
    if psi:
        (root / "pressure").mkdir()
        for r in ("cpu", "memory", "io"):
            (root / "pressure" / r).write_text(CALM.replace("1.00", "55.50") if r == "memory"
                                               else CALM)


def test_read_capacity_and_pressure(tmp_path: Path) -> None:
    fake_proc(tmp_path / "proc")
    (tmp_path / "sys/devices/system/cpu").mkdir(parents=True)
    (tmp_path / "sys/devices/system/cpu/online").write_text("0-3,6\n")
    cap = read_capacity(str(tmp_path / "proc"), str(tmp_path / "sys"))
    assert cap == Amount(5000, 2041234 * 1024, 15000)
    assert read_capacity(str(tmp_path / "proc")).cpu == len(os.sched_getaffinity(0)) * 1000
    hp = read_host_pressure(str(tmp_path / "proc"))
    assert hp.memory is not None and hp.memory.some.avg10 == 55.5
    assert hp.cpu is not None and hp.cpu.full is not None
    with pytest.raises(AdmissionRefused) as ei:
        check_pressure(hp, Thresholds())
    assert "memory" in ei.value.message


def test_read_without_psi_and_errors(tmp_path: Path) -> None:
    fake_proc(tmp_path, psi=False)
    assert read_host_pressure(str(tmp_path)) == HostPressure()
    (tmp_path / "meminfo").write_text("MemFree: 1 kB\n")
    with pytest.raises(KernelError) as ei:
        read_capacity(str(tmp_path))
    assert ei.value.op == "parse" and ei.value.target.endswith("meminfo")
    with pytest.raises(KernelError) as e2:
        read_capacity(str(tmp_path / "nope"))
    assert e2.value.op == "read"


def test_read_real_host() -> None:
    cap = read_capacity()
    assert cap.cpu >= 1000 and cap.memory > 0 and cap.pids > 0
    read_host_pressure()


def test_parsers() -> None:
    assert parse_cpu_list("0") == 1
    assert parse_cpu_list("0-7\n") == 8
    assert parse_cpu_list("0-1,4-5,9") == 5
    for bad in ("", "a", "3-1", "1-"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)
    assert parse_meminfo_total("MemTotal: 1024 kB") == 1 << 20


# ---- image on disk


def demo_manifest(**service: object) -> Manifest:
    return manifest_from_dict({
        "name": "demo", "service": {"command": "/bin/sh", "workdir": "/www", **service},
        "image": {"root": "/images/demo"},
        "writable": [{"kind": "tmpfs", "path": "/tmp", "size": "1M"},
                     {"kind": "tmpfs", "path": "/tmp/sub", "size": "1M"}],
    }, "demo.toml")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "images/demo"
    for d in ("bin", "www", "tmp", "usr/bin"):
        (img / d).mkdir(parents=True)
    busybox = img / "bin/busybox"
    busybox.write_text("#!\n")
    busybox.chmod(0o755)
    (img / "bin/sh").symlink_to("busybox")
    (img / "usr/bin/env").symlink_to("/bin/busybox")
    (img / "usr/bin/up").symlink_to("../../bin/busybox")
    (img / "bin/escape").symlink_to("../../../../../../etc/passwd")
    (img / "bin/abs-host").symlink_to("/etc/hostname")
    (img / "bin/loop").symlink_to("loop")
    (img / "bin/data").write_text("x")
    (img / "bin/data").chmod(0o644)
    return tmp_path


def test_image_ok(image: Path) -> None:
    check_image(demo_manifest(), str(image))
    for cmd in ("/usr/bin/env", "/usr/bin/up", "/bin/busybox"):
        check_image(demo_manifest(command=cmd), str(image))


@pytest.mark.parametrize(("command", "fragment"), [
    ("/bin/escape", "link '/bin/escape' -> '../../../../../../etc/passwd' escapes the image"),
    ("/bin/abs-host", "'/etc' does not exist in the image"),
    ("/bin/loop", "too many levels"),
    ("/bin/data", "not executable"),
    ("/bin", "not a regular file"),
    ("/bin/nope", "'/bin/nope' does not exist"),
    ("/bin/busybox/x", "does not exist"),
])
def test_image_command_problems(image: Path, command: str, fragment: str) -> None:
    with pytest.raises(ManifestError) as ei:
        check_image(demo_manifest(command=command), str(image))
    assert ei.value.code == "E_IMAGE"
    assert ei.value.key == "service.command"
    assert fragment in ei.value.message


def test_image_missing_dirs(image: Path) -> None:
    (image / "images/demo/www").rmdir()
    (image / "images/demo/tmp").rmdir()
    with pytest.raises(ManifestError) as ei:
        check_image(demo_manifest(), str(image))
    assert ei.value.keys == ("service.workdir", "writable[0].path")  # /tmp/sub is under /tmp
    with pytest.raises(ManifestError) as e2:
        check_image(demo_manifest(), str(image / "elsewhere"))
    assert e2.value.key == "image.root"
