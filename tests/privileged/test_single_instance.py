"""One agentd per state directory, with real agentd processes (``python -m agent.daemon``).

A second agentd started while the first runs must exit 1 with E_BUSY naming the lock file
and the first's pid, and leave everything of the first's byte-for-byte alone: the journal
(seeded with records, a torn tail and a left-over compaction file, each of which opening
the journal would repair), the lock file, the pid file and the socket.  A lock left by a
kill -9'd agentd is free at once.

The first agentd runs with ``--no-cells``: on the host, the cell manager would set up the
host's cgroups and a bridge.  The second runs as the boot does (cells on) against the same
socket, so that if the lock failed, the socket check would still stop it before the
manager: the test then fails on the message, never by touching the host.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli.client import Client, ConnectError
from agent.kernel.journal import Journal, read_journal
from agent.kernel.lock import LOCK_NAME

REPO = Path(__file__).resolve().parents[2]
Snapshot = dict[str, tuple[bytes | None, int, int]]


class Agentd:
    """One real agentd process; stopped (SIGTERM, then SIGKILL) by :meth:`stop`."""

    def __init__(self, tmp: Path, name: str, state: Path, socket: Path, pidfile: Path,
                 *extra: str) -> None:
        self.socket = socket
        self.log = tmp / f"{name}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.daemon", "--config", str(tmp / "none.toml"),
                 "--socket", str(socket), "--pidfile", str(pidfile),
                 "--state-dir", str(state), "--log-level", "debug", *extra],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_serving(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                with Client(self.socket, 2) as c:
                    status = c.call("status")
                assert status["pid"] == self.pid, status
                return
            except ConnectError:
                assert self.proc.poll() is None, f"agentd exited:\n{self.log.read_text()}"
                assert time.monotonic() < deadline, f"agentd not up:\n{self.log.read_text()}"
                time.sleep(0.05)

    def wait_exit(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"agentd {self.pid} kept running:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Agentd]]:
    procs: list[Agentd] = []
    try:
        yield procs
    finally:
        for d in procs:
            d.stop()


def _snapshot(*dirs: Path) -> Snapshot:
    """Every entry below ``dirs``: content (files), inode and mtime."""
    out: Snapshot = {}
    for top in dirs:
        for root, subdirs, files in os.walk(top):
            for name in subdirs + files:
                p = Path(root) / name
                st = p.lstat()
                data = p.read_bytes() if p.is_file() and not p.is_symlink() else None
                out[str(p)] = (data, st.st_ino, st.st_mtime_ns)
    return out


def _seed_journal(state: Path) -> Path:
    state.mkdir(mode=0o700)
    path = state / "agent.journal"
    with Journal(path) as j:
        for i in range(5):
            j.append("cell", {"name": f"c{i}", "state": "running"}, sync=True)
    with path.open("ab") as f:
        f.write(b"\x00torn")  # a torn tail: opening the journal truncates it
    (state / "agent.journal.tmp").write_bytes(b"half a compaction")  # opening removes it
    scan = read_journal(path)
    assert len(scan.records) == 5 and scan.torn_bytes > 0
    return path


def test_second_agentd_exits_busy_and_leaves_the_first_alone(
        tmp_path: Path, started: list[Agentd]) -> None:
    state, run = tmp_path / "state", tmp_path / "run"
    journal = _seed_journal(state)
    sock, pidfile = run / "agentd.sock", run / "agentd.pid"
    first = Agentd(tmp_path, "first", state, sock, pidfile, "--no-cells")
    started.append(first)
    first.wait_serving()
    lock = state / LOCK_NAME
    assert lock.read_text() == f"{first.pid}\n"
    assert pidfile.read_text() == f"{first.pid}\n"
    before = _snapshot(state, run)
    assert str(journal) in before and str(sock) in before

    # as the boot starts it: cells on, same socket and pid file
    second = Agentd(tmp_path, "second", state, sock, pidfile)
    started.append(second)
    assert second.wait_exit() == 1
    err = second.log.read_text()
    assert "error[E_BUSY]" in err and f"`{lock}`" in err and f"pid {first.pid}" in err, err
    assert "hint:" in err
    assert "listening" not in err and "journal" not in err and "cell manager" not in err
    assert _snapshot(state, run) == before

    # its own socket and pid file, same state dir: only the lock stands in the way
    other_sock, other_pid = tmp_path / "other" / "agentd.sock", tmp_path / "other" / "agentd.pid"
    third = Agentd(tmp_path, "third", state, other_sock, other_pid, "--no-cells")
    started.append(third)
    assert third.wait_exit() == 1
    assert f"pid {first.pid}" in third.log.read_text()
    assert not other_sock.exists() and not other_pid.exists()
    assert _snapshot(state, run) == before

    with Client(sock, 2) as c:  # the first one never noticed
        assert c.call("status")["pid"] == first.pid
    first.stop()
    assert first.proc.returncode == 0
    assert read_journal(journal).torn_bytes > 0  # nobody opened it


def test_lock_of_a_killed_agentd_is_free(tmp_path: Path, started: list[Agentd]) -> None:
    state, run = tmp_path / "state", tmp_path / "run"
    sock, pidfile = run / "agentd.sock", run / "agentd.pid"
    first = Agentd(tmp_path, "first", state, sock, pidfile, "--no-cells")
    started.append(first)
    first.wait_serving()
    first.proc.send_signal(signal.SIGKILL)
    assert first.wait_exit() == -signal.SIGKILL
    # it left everything behind: lock file with its pid, pid file, socket file
    assert (state / LOCK_NAME).read_text() == f"{first.pid}\n"
    assert pidfile.read_text() == f"{first.pid}\n" and sock.exists()

    again = Agentd(tmp_path, "again", state, sock, pidfile, "--no-cells")
    started.append(again)
    again.wait_serving()
    assert (state / LOCK_NAME).read_text() == f"{again.pid}\n"
    assert pidfile.read_text() == f"{again.pid}\n"
    # and it holds the lock in turn
    late = Agentd(tmp_path, "late", state, tmp_path / "late.sock", tmp_path / "late.pid",
                  "--no-cells")
    started.append(late)
    assert late.wait_exit() == 1
    assert f"pid {again.pid}" in late.log.read_text()
    again.stop()
    assert again.proc.returncode == 0 and not pidfile.exists() and not sock.exists()


# ------------------------------------------------- the init script, run for real with busybox

# /usr/bin/agentd and agentctl as the image writes them; AGENTD_TEST_DELAY seconds before
# agentd's main stand for a slow Python start-up (a loaded box).
AGENTD_SCRIPT = ("#!{python}\nimport os, sys, time\nsys.path.insert(0, {repo!r})\n"
                 "time.sleep(float(os.environ.get('AGENTD_TEST_DELAY', '0')))\n"
                 "from agent.daemon.main import main\nsys.exit(main())\n")
AGENTCTL_SCRIPT = ("#!{python}\nimport sys\nsys.path.insert(0, {repo!r})\n"
                   "from agent.cli.main import main\nsys.exit(main())\n")


@pytest.fixture
def initbox(tmp_path: Path) -> Iterator[Path]:
    """rootfs-overlay's S50agentd with its paths under ``tmp_path``, starting a real agentd
    (--no-cells) through a /usr/bin/agentd written as the image writes it."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.fail("busybox is not installed (the box's init is busybox)")
    for d in ("bin", "sbin", "run", "log", "default"):
        (tmp_path / d).mkdir()
    os.symlink(busybox, tmp_path / "sbin/start-stop-daemon")
    os.symlink(busybox, tmp_path / "sbin/setsid")
    for name, text in (("agentd", AGENTD_SCRIPT), ("agentctl", AGENTCTL_SCRIPT)):
        (tmp_path / "bin" / name).write_text(text.format(python=sys.executable, repo=str(REPO)))
        (tmp_path / "bin" / name).chmod(0o755)
    (tmp_path / "default/agentd").write_text(
        f'STATEDIR="{tmp_path}/state"\nSOCKET="{tmp_path}/run/agentd.sock"\n'
        f'AGENTD_ARGS="--config {tmp_path}/none.toml --socket {tmp_path}/run/agentd.sock '
        f'--state-dir {tmp_path}/state --no-cells"\n')
    script = (REPO / "rootfs-overlay/etc/init.d/S50agentd").read_text()
    for real, fake in (("/usr/bin/", "bin/"), ("/var/run/", "run/"), ("/var/log/", "log/"),
                       ("/etc/default/", "default/")):
        script = script.replace(real, f"{tmp_path}/{fake}")
    assert "/var/lib/agent" in script  # STATEDIR: the default, overridden above
    (tmp_path / "S50agentd").write_text(script)
    before = _children()
    try:
        yield tmp_path
    finally:
        for pid in _agentds(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _reap(_children() - before)


def _children() -> set[int]:
    """This process's children.  agentd code run earlier in the session may have made the
    test process a child subreaper, so daemonized agentds (start-stop-daemon
    --background) are reparented to it when their launcher exits."""
    out: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            out |= {int(x) for x in (task / "children").read_text().split()}
    return out


def _reap(pids: set[int], timeout: float = 10.0) -> None:
    """Wait for the processes this test left as our children (the next tests check that
    the test process has none)."""
    deadline = time.monotonic() + timeout
    for pid in sorted(pids):
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.02)


def _init(box: Path, action: str, **env: str) -> subprocess.Popen[str]:
    env = {"PATH": f"{box}/sbin:/usr/sbin:/usr/bin:/sbin:/bin", **env}
    return subprocess.Popen(["busybox", "sh", str(box / "S50agentd"), action], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _out(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=90)
    return proc.returncode, out


def _agentds(box: Path) -> list[int]:
    """Live agentd processes of this box (zombies have an empty cmdline)."""
    out = []
    me = str(box / "bin/agentd").encode()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if me in (p / "cmdline").read_bytes().split(b"\0"):
                    out.append(int(p.name))
    return out


def test_init_script_starts_are_idempotent_under_a_race(initbox: Path) -> None:
    box = initbox
    pidfile, lock = box / "run/agentd.pid", box / "state" / LOCK_NAME
    for _round in range(3):
        starts = [_init(box, "start") for _ in range(3)]  # all at once
        results = [_out(p) for p in starts]
        for rc, out in results:
            assert rc == 0 and out.startswith("Starting agentd: OK"), (results, _log(box))
        live = _one_agentd(box)
        assert pidfile.read_text() == f"{live[0]}\n" and lock.read_text() == f"{live[0]}\n"
        with Client(box / "run/agentd.sock", 5) as c:
            assert c.call("status")["pid"] == live[0]
        rc, out = _out(_init(box, "stop"))
        assert (rc, out) == (0, "Stopping agentd: OK\n")
        assert _agentds(box) == [] and not pidfile.exists()


def test_init_script_start_while_agentd_is_starting(initbox: Path) -> None:
    box = initbox
    first = _init(box, "start")
    launch = box / "run/agentd.launch"
    deadline = time.monotonic() + 30
    while not _launched(launch):  # agentd exec'd, and far from serving: Python starts up
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.002)
    assert not (box / "run/agentd.pid").exists()
    second = _init(box, "start")
    (rc1, out1), (rc2, out2) = _out(first), _out(second)
    assert (rc1, rc2) == (0, 0) and out1 == out2 == "Starting agentd: OK\n", (out1, out2)
    live = _one_agentd(box)
    assert (box / "run/agentd.pid").read_text() == f"{live[0]}\n"
    assert "E_BUSY" not in _log(box)  # the second start did not even launch one
    rc, out = _out(_init(box, "start"))
    assert (rc, out) == (0, "Starting agentd: OK (already running)\n")
    # killed hard: the next start is not fooled by the lock file or pid file left behind
    os.kill(live[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _agentds(box):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rc, out = _out(_init(box, "start"))
    assert (rc, out) == (0, "Starting agentd: OK\n"), _log(box)
    again = _one_agentd(box)
    assert again != live
    rc, out = _out(_init(box, "stop"))
    assert rc == 0 and _agentds(box) == []


def test_init_script_waits_for_a_slow_agentd(initbox: Path) -> None:
    """A real agentd slower to start than any fixed grace (3 s before its main, as Python
    on a loaded box), and no run directory yet (the box has no /var/run): start waits
    for it to answer, then says OK."""
    box = initbox
    shutil.rmtree(box / "run")
    t0 = time.monotonic()
    rc, out = _out(_init(box, "start", AGENTD_TEST_DELAY="3"))
    assert (rc, out) == (0, "Starting agentd: OK\n"), _log(box)
    assert time.monotonic() - t0 >= 3
    live = _one_agentd(box)
    with Client(box / "run/agentd.sock", 0.5) as c:  # it answers at once
        assert c.call("status")["pid"] == live[0]
    rc, out = _out(_init(box, "stop"))
    assert rc == 0 and _agentds(box) == []


def test_init_script_says_why_agentd_failed(initbox: Path) -> None:
    box = initbox
    (box / "none.toml").write_text("log_level = 7\n")  # not a level: agentd exits 2
    rc, out = _out(_init(box, "start"))
    assert rc == 1 and out.startswith("Starting agentd: FAIL (agentd exited with status 2: "
                                      "agentd: "), out
    assert out.endswith(f"; see {box}/log/agentd.log)\n") and "log_level" in out, out
    assert _agentds(box) == []


def _one_agentd(box: Path) -> list[int]:
    """The one agentd left once the losers of a race (E_BUSY) have finished exiting."""
    deadline = time.monotonic() + 20
    while len(live := _agentds(box)) != 1:
        assert time.monotonic() < deadline, (live, _log(box))
        time.sleep(0.05)
    return live


def _launched(launch: Path) -> bool:
    with contextlib.suppress(OSError, ValueError):
        pid = int(launch.read_text())
        return str(launch.parent.parent / "bin/agentd").encode() in (
            Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))
    return False


def _log(box: Path) -> str:
    try:
        return (box / "log/agentd.log").read_text()
    except OSError:
        return ""
