"""agent.diag: the console screen and the bundle, on a fake tree with a fake client,
and once against a real agentd started as a subprocess."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import __version__
from agent.cli.client import Client, ConnectError
from agent.cli.diag import cli_main
from agent.cli.diagbundle import SECTIONS, Bundle, default_bundle_path, write_bundle
from agent.cli.diagscreen import HEIGHT, WIDTH, Sources, query_daemon, screen
from agent.core.errors import NotFoundError
from agent.core.kconfig import render_fragment

RELEASE = "6.1.0-test"
UNAME = os.uname_result(("Linux", "stb-7", RELEASE, "#1 SMP", "aarch64"))


def put(root: Path, path: str, data: str | bytes = "") -> Path:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data)
    return p


def make_tree(root: Path, *, config: str | None = None) -> Path:
    """A box's /proc, /sys, /etc/agent and /var, as files."""
    for ns in ("mnt", "uts", "ipc", "pid", "net", "user", "cgroup"):
        put(root, f"/proc/self/ns/{ns}")
    put(root, "/proc/self/mounts",
        "proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n")
    put(root, "/proc/self/mountinfo", "22 1 0:21 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    put(root, "/proc/filesystems", "nodev\ttmpfs\nnodev\tcgroup\nnodev\tcgroup2\nnodev\toverlay\n")
    put(root, "/proc/self/status", "Seccomp:\t0\n")
    put(root, "/proc/sys/kernel/seccomp/actions_avail", "kill_process errno user_notif allow\n")
    put(root, "/proc/sys/fs/fanotify/max_user_marks", "8192\n")
    for res in ("cpu", "memory", "io"):
        put(root, f"/proc/pressure/{res}", "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    put(root, "/proc/modules", "bridge 1 0 - Live 0x0\nveth 1 0 - Live 0x0\n"
                               "8021q 1 0 - Live 0x0\nnf_tables 1 0 - Live 0x0\n")
    put(root, "/proc/meminfo", "MemTotal:  1048576 kB\nMemFree: 100 kB\n"
                               "MemAvailable:  524288 kB\n")
    put(root, "/proc/cmdline", "console=ttyAMA0 root=/dev/vda\n")
    put(root, "/sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n")
    cell = root / "sys/fs/cgroup/agent/web"
    for name, text in (("cpu.max", "50000 100000\n"), ("memory.max", "67108864\n"),
                       ("memory.events", "low 0\nhigh 2\nmax 0\noom 0\n"),
                       ("pids.max", "64\n"), ("cgroup.procs", "123\n"), ("io.stat", "x\n")):
        put(cell, name, text)
    put(root, "/sys/fs/cgroup/agent/cgroup.subtree_control", "cpu memory pids\n")
    put(root, "/etc/agent/agentd.toml", '[logs]\njournal_max = "2M"\n')
    put(root, "/etc/agent/policy.toml", "# policy\n")
    put(root, "/etc/agent/services/web.toml", "# web\n")
    put(root, "/etc/agent/keys/patterns.key", "PRIVATE KEY MATERIAL\n")
    put(root, "/etc/agent/keys/patterns.pub", "public\n")
    put(root, "/var/lib/agent/agent.journal", b"\0" * 3000)
    put(root, "/var/run/agentd.pid", "999999\n")
    put(root, "/var/log/agentd.log",
        "10:00:00.000 agentd[9] I agentd: agentd 0.1.0 listening\n"
        "10:00:01.000 agentd[9] E agent.master: cell web: plan failed: first problem\n"
        "10:00:02.000 agentd[9] W agent.master: a warning\n"
        "10:00:03.000 agentd[9] E agent.master: cell web: second problem\n")
    if config is not None:
        put(root, f"/boot/config-{RELEASE}", config)
    return root


def amount(cpu: int, mem: int, pids: int) -> dict[str, int]:
    return {"cpu_m": cpu, "memory": mem, "pids": pids}


def event(i: int, severity: str = "alert") -> dict[str, Any]:
    return {"ts": 1.7e9 + i, "cell": "web", "channel": "seccomp", "kind": f"trap{i}",
            "severity": severity, "attrs": {"syscall": "mount", "n": i}}


class FakeClient:
    """Answers like agentd from a table: a value, or an exception to raise."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.closed = 0

    def call(self, op: str, /, **args: Any) -> Any:
        self.calls.append((op, args))
        ans = self.answers[op]
        if callable(ans):
            ans = ans(**args)
        if isinstance(ans, BaseException):
            raise ans
        return ans

    def close(self) -> None:
        self.closed += 1


def up_answers(n_events: int = 30, cells: int = 3) -> dict[str, Any]:
    states = ["running", "running", "failed", "stopped"]
    ps = [{"name": f"c{i}", "state": states[i % 4]} for i in range(cells)]

    def inspect(name: str) -> Any:
        if name == "c1":
            return NotFoundError("E_NOT_FOUND", "cell `c1` vanished")
        return {"name": name, "state": "running"}

    def events(n: int, severity: str | None = None) -> list[dict[str, Any]]:
        evs = [event(i) for i in range(n_events)]
        return evs[-n:]

    return {
        "status": {"version": __version__, "pid": 4242, "uptime_s": 3725.5, "events": 77,
                   "cgroup": "v2", "budget": {
                       "capacity": amount(2000, 1 << 30, 4000),
                       "reserve": amount(250, 96 << 20, 256),
                       "free": amount(1250, 700 << 20, 3000),
                       "committed": amount(500, 128 << 20, 744),
                       "states": {"running": 2}, "leases": 2}},
        "ps": ps, "inspect": inspect, "events": events,
    }


def sources(root: Path, answers: dict[str, Any] | None, **kw: Any) -> tuple[Sources, FakeClient]:
    fake = FakeClient(answers or {})

    def connect() -> FakeClient:
        if answers is None:
            raise ConnectError("E_CONNECT", "socket `/run/agent/agentd.sock` does not exist",
                               "is agentd running?")
        return fake

    kw.setdefault("which", lambda tool: None)
    return Sources(root=root, client=connect, uname=lambda: UNAME,
                   clock=lambda: 1.7e9, **kw), fake


def check_fits(lines: list[str]) -> None:
    assert 0 < len(lines) <= HEIGHT, lines
    too_wide = [x for x in lines if len(x) > WIDTH]
    assert not too_wide, too_wide


def test_screen_with_daemon_up(tmp_path: Path) -> None:
    src, fake = sources(make_tree(tmp_path, config=render_fragment()), up_answers())
    lines = screen(src)
    check_fits(lines)
    text = "\n".join(lines)
    assert f"agent {__version__} diag on stb-7" in lines[0]
    assert "pid 4242 up 1h02m" in text
    assert f"kernel   {RELEASE} aarch64, cgroup v2, config /boot/config-{RELEASE}" in text
    assert "1 missing, 0 unknown: no ikconfig" in text and "MISSING required" not in text
    assert "cells    3: 1 failed, 2 running" in text
    assert "budget   free cpu 1.25 mem 700.0M pids 3000; used cpu 0.50 mem 128.0M" in text
    assert "journal  2.9K (max 2.0M)" in text
    assert "memory   512.0M available of 1.0G" in text
    # the newest events are shown, the oldest ones are not
    assert "trap29" in text and "trap0 " not in text
    assert "second problem" in text and "a warning" not in text
    assert ("events", {"n": 8, "severity": "notice"}) in fake.calls
    assert fake.closed == 1


def test_screen_with_daemon_down(tmp_path: Path) -> None:
    src, _ = sources(make_tree(tmp_path), None)
    lines = screen(src)
    check_fits(lines)
    text = "\n".join(lines)
    assert "agentd   DOWN: socket `/run/agent/agentd.sock` does not exist [E_CONNECT]" in text
    assert "pid file names 999999 (not running)" in text
    for head in ("kernel ", "features ", "journal ", "disk ", "memory "):
        assert any(x.startswith(head) for x in lines), head
    assert "cells " not in text and "budget " not in text
    assert "second problem" in text  # the log is read without the daemon


def test_screen_names_missing_required_features(tmp_path: Path) -> None:
    config = "".join(line + "\n" for line in render_fragment().splitlines()
                     if not line.startswith("CONFIG_BRIDGE_VLAN_FILTERING="))
    src, _ = sources(make_tree(tmp_path, config=config), up_answers())
    text = "\n".join(screen(src))
    assert "MISSING required: bridge_vlan" in text
    assert "2 missing, 0 unknown: no bridge_vlan, ikconfig" in text


def test_screen_survives_partial_answers(tmp_path: Path) -> None:
    answers = up_answers()
    answers["ps"] = NotFoundError("E_UNKNOWN_OP", "unknown op `ps`")
    answers["status"]["budget"] = "cells unavailable: no cgroup v2"
    src, _ = sources(make_tree(tmp_path), answers)
    (tmp_path / "proc/meminfo").unlink()
    lines = screen(src)
    check_fits(lines)
    text = "\n".join(lines)
    assert "cells    ? (ps failed)" in text
    assert "budget   cells unavailable: no cgroup v2" in text
    assert "! ps: error[E_UNKNOWN_OP]" in text
    assert "storage  error: FileNotFoundError" in text


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_events=st.integers(0, 60), cells=st.integers(0, 50),
       kind=st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=200),
       log_lines=st.integers(0, 30))
def test_screen_always_fits(tmp_path: Path, n_events: int, cells: int, kind: str,
                            log_lines: int) -> None:
    root = tmp_path / "t"
    if not root.exists():
        make_tree(root)
    put(root, "/var/log/agentd.log",
        "".join(f"10:00:{i:02d}.000 agentd[9] E x: {kind}\n" for i in range(log_lines)))
    answers = up_answers(n_events, cells)
    answers["events"] = [dict(event(i), kind=kind) for i in range(n_events)]
    for up in (answers, None):
        src, _ = sources(root, up)
        check_fits(screen(src))


# --------------------------------------------------------------------------- bundle

def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        top = {m.name.split("/")[0] for m in tar.getmembers()}
        assert top == {path.name.removesuffix(".tar.gz")}
        out = {}
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            out[m.name.split("/", 1)[1]] = f.read()
        return out


def fake_run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    if argv[0] == "dmesg":
        return subprocess.CompletedProcess(argv, 0, "".join(f"[{i}] line\n" for i in range(1000)))
    return subprocess.CompletedProcess(argv, 0, json.dumps([{"argv": argv}]), "")


def test_bundle_contents(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root", config=render_fragment())
    src, _ = sources(root, up_answers(), run=fake_run,
                     which=lambda t: None if t == "nft" else f"/usr/bin/{t}")
    out = tmp_path / "b.tar.gz"
    progress = io.StringIO()
    b = write_bundle(src, out, progress)
    assert b.errors == ["daemon: inspect c1: error[E_NOT_FOUND]: cell `c1` vanished"]
    got = members(out)
    assert sorted(got) == sorted([
        "agentd.log", "cgroup-tree.txt", "errors.txt", "index.txt", "summary.txt",
        "versions.json",
        "daemon/status.json", "daemon/ps.json", "daemon/events.json",
        "daemon/inspect/c0.json", "daemon/inspect/c2.json",
        "files/etc/agent/agentd.toml", "files/etc/agent/policy.toml",
        "files/etc/agent/services/web.toml", "files/etc/agent/keys/patterns.pub",
        "host/mountinfo", "host/proc-meminfo", "host/proc-pressure-cpu",
        "host/proc-pressure-io", "host/proc-pressure-memory",
        "kernel/checkconfig.json", "kernel/dmesg-tail.txt", "kernel/kconfig-summary.txt",
        "net/ip-link.json", "net/ip-addr.json", "net/bridge-vlan-show.json"])
    assert out.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" not in b"".join(got.values())
    index = got["index.txt"].decode()
    assert "note: skipped private key /etc/agent/keys/patterns.key" in index
    assert "note: nft not installed" in index
    assert got["errors.txt"].decode() == "".join(e + "\n" for e in b.errors)
    assert json.loads(got["daemon/ps.json"])[2]["name"] == "c2"
    assert json.loads(got["kernel/checkconfig.json"])["ok"] is True
    assert "CONFIG_BRIDGE_VLAN_FILTERING=y" in got["kernel/kconfig-summary.txt"].decode()
    assert len(got["kernel/dmesg-tail.txt"].decode().splitlines()) == 400
    tree = got["cgroup-tree.txt"].decode()
    assert "== /sys/fs/cgroup/agent/web" in tree
    assert "  cpu.max: 50000 100000" in tree and "  pids.max: 64" in tree
    assert "    high 2" in tree and "io.stat" not in tree
    assert json.loads(got["versions.json"])["agent"] == __version__
    assert got["summary.txt"].decode().startswith(f"agent {__version__} diag on stb-7")
    lines = progress.getvalue().splitlines()
    assert len(lines) == len(SECTIONS)
    assert lines[0].startswith(f"diag: [1/{len(SECTIONS)}] daemon")
    assert "ERROR (see errors.txt)" in lines[0]
    assert all(line.endswith("files") for line in lines)


def test_failing_collectors_are_recorded_and_bundle_still_made(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root")
    answers = up_answers()
    answers["ps"] = RuntimeError("ps exploded")
    src, _ = sources(root, answers, run=fake_run)

    def broken(src: Sources, b: Bundle) -> None:
        b.add("partial.txt", "kept")
        raise ValueError("collector bug")

    out = tmp_path / "b.tar.gz"
    write_bundle(src, out, io.StringIO(), sections=(*SECTIONS, ("broken", broken)))
    got = members(out)
    errors = got["errors.txt"].decode().splitlines()
    assert "daemon (status, ps, inspect, events): RuntimeError: ps exploded" in errors
    assert "broken: ValueError: collector bug" in errors
    assert got["partial.txt"] == b"kept"
    assert "daemon/status.json" in got and "daemon/ps.json" not in got
    assert "kernel/checkconfig.json" in got and "cgroup-tree.txt" in got


def test_bundle_with_daemon_down_and_no_tools(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root")
    (root / "var/log/agentd.log").unlink()
    src, _ = sources(root, None)
    out = tmp_path / "b.tar.gz"
    write_bundle(src, out, io.StringIO())
    got = members(out)
    assert got["errors.txt"].decode().startswith(
        "daemon (status, ps, inspect, events): ConnectError:")
    assert "agentd.log" not in got and not any(n.startswith("net/") for n in got)
    index = got["index.txt"].decode()
    assert "note: no /var/log/agentd.log" in index and "note: dmesg not installed" in index
    assert "DOWN" in got["summary.txt"].decode()


def test_cli_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_tree(tmp_path / "root")
    sock = tmp_path / "none.sock"
    assert cli_main(["--root", str(root), "--socket", str(sock)]) == 0
    out = capsys.readouterr().out.splitlines()
    check_fits(out)
    assert any(x.startswith("agentd   DOWN: socket `/") for x in out)
    bundle = tmp_path / "x.tar.gz"
    assert cli_main(["--root", str(root), "--socket", str(sock), "--bundle", str(bundle)]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith(f"{bundle} (") and "diag: [1/" in cap.err
    assert "errors.txt" in members(bundle)
    assert cli_main(["--root", str(root), "--bundle", str(tmp_path / "no/dir/x.tar.gz")]) == 1
    assert "error[E_DIAG]" in capsys.readouterr().err
    assert not list((tmp_path).glob("no"))
    assert cli_main(["--bogus"]) == 2


def test_default_bundle_path() -> None:
    src = Sources(uname=lambda: UNAME, clock=lambda: 0.0)
    assert default_bundle_path(src) == Path("/tmp/agent-diag-stb-7-19700101-000000.tar.gz")


# --------------------------------------------------------------------------- real agentd

@pytest.fixture
def agentd(tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "agentd.sock"
    with (tmp_path / "agentd.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.daemon", "--config", str(tmp_path / "none.toml"),
             "--socket", str(sock), "--pidfile", str(tmp_path / "agentd.pid"),
             "--state-dir", str(tmp_path / "state"), "--no-cells"], stdout=log, stderr=log)
    try:
        wait(lambda: _pings(sock), proc)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def _pings(sock: Path) -> bool:
    try:
        with Client(sock, 1) as c:
            return bool(c.call("ping") == "pong")
    except ConnectError:
        return False


def wait(cond: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not cond():
        assert proc.poll() is None and time.monotonic() < deadline, "agentd did not start"
        time.sleep(0.05)


def test_against_real_agentd(tmp_path: Path, agentd: Path) -> None:
    root = make_tree(tmp_path / "root")
    src = Sources(root=root, socket=agentd, uname=lambda: UNAME)
    view = query_daemon(src)
    assert view.down is None and view.status is not None
    lines = screen(src, view)
    check_fits(lines)
    text = "\n".join(lines)
    assert f"pid {view.status['pid']} up" in text
    # --no-cells: no ps op; the screen says so instead of failing
    assert "cells    ? (ps failed)" in text and "unknown op" in text.lower()
    assert "notice master - started" in text  # the daemon's own notice event
    out = tmp_path / "b.tar.gz"
    write_bundle(src, out, io.StringIO())
    got = members(out)
    assert json.loads(got["daemon/status.json"])["pid"] == view.status["pid"]


def test_bundle_is_gzip(tmp_path: Path) -> None:
    src, _ = sources(make_tree(tmp_path / "root"), None)
    out = tmp_path / "b.tar.gz"
    write_bundle(src, out, io.StringIO())
    assert gzip.decompress(out.read_bytes())[257:262] == b"ustar"
