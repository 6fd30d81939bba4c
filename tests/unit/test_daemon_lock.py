"""agentd's instance lock (agent.daemon.InstanceLock): one agentd per state directory.

Real flock(2) on real files; another holder is a real process.  The end-to-end case (two
real agentd processes, the first's state untouched) is tests/privileged/test_single_instance.py.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.core.errors import KernelError
from agent.kernel.lock import LOCK_NAME, InstanceBusyError, InstanceLock

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
if sys.argv[2] == "pid":
    os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(60)
"""


def _holder(path: Path, write_pid: bool) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path),
                             "pid" if write_pid else "-"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def test_lock_file_is_private_cloexec_and_names_the_holder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with InstanceLock(state) as lock:
        assert lock.held and lock.path == state / LOCK_NAME
        st = lock.path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert lock.path.read_text() == f"{os.getpid()}\n"
        assert lock._fd is not None
        assert fcntl.fcntl(lock._fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    # released, but never removed: a removed lock file would let two holders in
    assert (lock.held, lock.path.exists()) == (False, True)


def test_second_holder_is_refused_without_writing(tmp_path: Path) -> None:
    first = InstanceLock(tmp_path).acquire()
    try:
        before = first.path.read_bytes()
        with pytest.raises(InstanceBusyError) as info:
            InstanceLock(tmp_path).acquire()
        err = info.value
        assert err.code == "E_BUSY" and err.holder == os.getpid() and err.hint
        assert str(first.path) in err.message and f"pid {os.getpid()}" in err.message
        assert first.path.read_bytes() == before
    finally:
        first.release()
    second = InstanceLock(tmp_path).acquire()  # released = free again
    second.release()


def test_a_longer_stale_pid_is_overwritten_cleanly(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("123456789\nleftover\n")
    with InstanceLock(tmp_path) as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"


def test_holder_in_another_process_then_killed(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    proc = _holder(path, write_pid=True)
    try:
        with pytest.raises(InstanceBusyError) as info:
            InstanceLock(tmp_path).acquire()
        assert info.value.holder == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    # flock dies with its holder: nothing to clean up
    with InstanceLock(tmp_path) as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"


def test_holder_that_has_not_written_its_pid_yet(tmp_path: Path) -> None:
    proc = _holder(tmp_path / LOCK_NAME, write_pid=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(InstanceBusyError) as info:
            InstanceLock(tmp_path, pid_wait=0.2).acquire()
        assert time.monotonic() - t0 >= 0.2  # it waited for the pid a little
        assert info.value.holder is None and "not written yet" in info.value.message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def test_unusable_state_dir_is_a_kernel_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(KernelError) as info:
        InstanceLock(tmp_path / "file").acquire()
    assert info.value.code == "E_KERNEL" and "state dir" in (info.value.hint or "")
    # a symlink planted at the lock path is not followed
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / LOCK_NAME).symlink_to(tmp_path / "victim")
    with pytest.raises(KernelError):
        InstanceLock(tmp_path / "s").acquire()
    assert not (tmp_path / "victim").exists()


def test_check_takes_no_lock(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with InstanceLock(state):  # a running agentd does not stop --check
        res = subprocess.run([sys.executable, "-m", "agent.daemon", "--check", "--config",
                              str(tmp_path / "none.toml"), "--state-dir", str(state)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    fresh = tmp_path / "fresh"
    res = subprocess.run([sys.executable, "-m", "agent.daemon", "--check", "--config",
                          str(tmp_path / "none.toml"), "--state-dir", str(fresh)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not fresh.exists()


def test_check_refuses_a_bad_correlation_table_as_a_start_would(tmp_path: Path) -> None:
    """[correlation] is kept as written by the config parser and read by channel 4:
    --check reads it too (exit 2, the key and a hint); the control: a good one passes."""
    conf = tmp_path / "agentd.toml"
    for table, rc in (("queue = 5\n", 2), ("surprise = 1\n", 2),
                      ("queue = 512\nbatch = 64\n", 0)):
        conf.write_text("[correlation]\n" + table)
        res = subprocess.run([sys.executable, "-m", "agent.daemon", "--check", "--config",
                              str(conf), "--state-dir", str(tmp_path / "s")],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == rc, (table, res.stderr)
        if rc:
            assert "correlation." in res.stderr and "hint:" in res.stderr, res.stderr
