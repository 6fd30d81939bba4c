"""agent.checkconfig against built trees, reduced configs and the live host."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from agent.cli.checkconfig import cli_main, render
from agent.core.features import summarize, to_json
from agent.core.kconfig import FEATURES, Status, render_fragment
from agent.kernel.probes import check

RELEASE = "6.1.0-test"


def make_box(root: Path, *, v2: bool = True, psi: bool = True,
             config: str | None = None) -> Path:
    """A /proc + /sys tree shaped like a cgroup-v2 box (or a v1 host)."""
    def put(path: str, text: str = "") -> None:
        p = root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    for ns in ("mnt", "uts", "ipc", "pid", "net", "user", "cgroup"):
        put(f"proc/self/ns/{ns}")
    put("proc/sys/user/max_user_namespaces", "15000\n")
    put("proc/filesystems", "nodev\tsysfs\nnodev\ttmpfs\nnodev\tcgroup\nnodev\tcgroup2\n"
                           "nodev\toverlay\n\text4\n")
    put("proc/self/status", "Name:\tpython3\nSeccomp:\t0\nSeccomp_filters:\t0\n")
    put("proc/sys/kernel/seccomp/actions_avail",
        "kill_process kill_thread trap errno user_notif trace log allow\n")
    put("proc/sys/fs/fanotify/max_user_marks", "8192\n")
    if psi:
        for res in ("cpu", "memory", "io"):
            put(f"proc/pressure/{res}", "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    if v2:
        put("proc/self/mounts", "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec 0 0\n")
        put("sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory hugetlb pids rdma misc\n")
    else:
        put("proc/self/mounts", "".join(
            f"cgroup /sys/fs/cgroup/{d} cgroup rw,nosuid,{d} 0 0\n"
            for d in ("memory", "cpu", "pids", "blkio", "cpuset")))
        for d in ("memory", "cpu", "pids", "blkio", "cpuset"):
            (root / "sys/fs/cgroup" / d).mkdir(parents=True)
    put("proc/modules", "bridge 311296 0 - Live 0x0\nveth 40960 0 - Live 0x0\n")
    put(f"lib/modules/{RELEASE}/modules.builtin", "kernel/net/netfilter/nf_tables.ko\n")
    put(f"lib/modules/{RELEASE}/modules.dep", "kernel/net/8021q/8021q.ko: kernel/net/802/garp.ko\n")
    if config is not None:
        (root / "proc").mkdir(exist_ok=True)
        (root / "proc/config.gz").write_bytes(gzip.compress(config.encode()))
    return root


def reduced(*drop: str) -> str:
    return "\n".join(line for line in render_fragment().splitlines()
                     if not any(line.startswith(f"CONFIG_{s}=") for s in drop)) + "\n"


def test_full_box_is_all_present(tmp_path: Path) -> None:
    report = check(make_box(tmp_path, config=render_fragment()), release=RELEASE)
    bad = [(f.feature.name, f.status, f.detail) for f in report.features
           if f.status is not Status.PRESENT]
    assert bad == []
    assert report.ok
    assert report.config_source == str(tmp_path / "proc/config.gz")
    assert report.get("vlan").detail == "module, not loaded yet"


def test_reduced_config_reports_missing_items(tmp_path: Path) -> None:
    cfg = reduced("BRIDGE_VLAN_FILTERING", "PSI", "FANOTIFY_ACCESS_PERMISSIONS", "PROC_EVENTS")
    report = check(make_box(tmp_path, config=cfg), release=RELEASE)
    status = {f.feature.name: f.status for f in report.features}
    assert status["bridge_vlan"] is Status.MISSING
    assert status["proc_connector"] is Status.MISSING
    assert status["fanotify"] is Status.DEGRADED
    # the probe sees /proc/pressure: the running kernel has PSI whatever the config says
    assert status["psi"] is Status.PRESENT
    assert not report.ok
    text = render(report)
    assert "CONFIG_BRIDGE_VLAN_FILTERING not set" in text
    assert "Result: missing bridge_vlan" in text


def test_config_only_mode(tmp_path: Path) -> None:
    cfg_file = tmp_path / "config"
    cfg_file.write_text(reduced("PSI", "VETH"))
    report_rc = cli_main(["--config", str(cfg_file), "--json"])
    assert report_rc == 1  # VETH is required


def test_cli_json_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_box(tmp_path / "ok", config=render_fragment())
    assert cli_main(["--root", str(root), "--release", RELEASE, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True
    assert {f["name"] for f in data["features"]} == {f.name for f in FEATURES}
    assert all(f["status"] == "present" for f in data["features"])

    cfg = tmp_path / "reduced.config"
    cfg.write_text(reduced("PSI"))
    assert cli_main(["--config", str(cfg)]) == 0  # PSI is not required
    out = capsys.readouterr().out
    assert "pressure stall information" in out and "MISSING" in out
    assert "periodic samples" in out

    assert cli_main(["--config", str(tmp_path / "nope")]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"\x1f\x8bjunk")
    assert cli_main(["--config", str(bad)]) == 2
    assert cli_main(["--bogus"]) == 2


def test_cgroup_v1_host_is_degraded(tmp_path: Path) -> None:
    report = check(make_box(tmp_path, v2=False, psi=False, config=render_fragment()),
                   release=RELEASE)
    assert report.get("cgroup2").status is Status.DEGRADED
    assert report.get("memory").status is Status.DEGRADED
    assert "cgroup v1" in report.get("memory").detail
    assert report.get("psi").status is Status.MISSING
    assert report.ok  # degraded, not missing
    lines = summarize(report)
    assert lines[0].startswith(f"kernel {RELEASE}:")
    assert any(line.startswith("feature cgroup2 degraded") and "cgroupspy" in line
               for line in lines)
    assert any(line.startswith("feature psi missing") for line in lines)


def test_no_config_no_proc(tmp_path: Path) -> None:
    report = check(tmp_path, release=RELEASE)
    assert report.config_source is None
    assert {f.status for f in report.features} <= {Status.UNKNOWN, Status.MISSING}
    assert report.get("bridge_vlan").status is Status.UNKNOWN
    render(report)


def test_boot_config_fallback(tmp_path: Path) -> None:
    root = make_box(tmp_path)
    (root / "boot").mkdir()
    (root / f"boot/config-{RELEASE}").write_text(reduced("CGROUP_PIDS"))
    report = check(root, release=RELEASE)
    assert report.config_source == str(root / f"boot/config-{RELEASE}")
    # probe says pids is in cgroup.controllers: the running kernel wins
    assert report.get("pids").status is Status.PRESENT


def test_render_fits_80_columns(tmp_path: Path) -> None:
    report = check(make_box(tmp_path, v2=False, config=reduced("BRIDGE_VLAN_FILTERING", "PSI")),
                   release=RELEASE)
    for line in render(report).splitlines():
        if line.strip() == report.config_source:
            continue  # a path is never broken
        assert len(line) <= 80, line
    assert to_json(report)["ok"] is False


def test_live_host_does_not_crash(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main([])
    out = capsys.readouterr().out
    assert rc in (0, 1)
    assert out.splitlines()[0] == f"Kernel {os.uname().release}"
    report = check()
    unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    assert (report.get("cgroup2").status is Status.PRESENT) == unified
    if not unified:  # the development hosts are cgroup v1 / hybrid
        assert report.get("cgroup2").status in (Status.DEGRADED, Status.MISSING)
    assert report.get("namespaces").status is Status.PRESENT
    for line in summarize(report):
        assert "\n" not in line
