"""agent.kernel.signalfd on the real kernel, in a child process (the watch blocks
signals in the thread that makes it: never in pytest's own)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHILD = f"""
import json, select, sys
sys.path.insert(0, {str(REPO)!r})
from agent.kernel.signalfd import SignalWatch
watch = SignalWatch()
print("ready", flush=True)
got = []
while len(got) < 3:
    select.select([watch.fileno()], [], [], 30)
    got += [[r.name, r.pid, r.uid, r.code] for r in watch.read()]
print(json.dumps(got), flush=True)
"""


def child() -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "ready\n"
    return p


def test_unexpected_signals_are_read_with_their_sender_and_do_not_kill() -> None:
    p = child()
    for sig in (signal.SIGUSR1, signal.SIGWINCH, signal.SIGHUP):
        os.kill(p.pid, sig)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0  # SIGUSR1 and SIGHUP would have ended it
    got = json.loads(out)
    assert sorted(x[0] for x in got) == ["SIGHUP", "SIGUSR1", "SIGWINCH"]
    assert all(x[1] == os.getpid() and x[2] == os.getuid() and x[3] == 0 for x in got)


def test_the_control_without_a_watch_sigusr1_ends_the_process() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import sys, time\nprint('ready', "
                          "flush=True)\ntime.sleep(30)"], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "ready\n"
    os.kill(p.pid, signal.SIGUSR1)
    assert p.wait(timeout=30) == -signal.SIGUSR1


def test_read_with_nothing_pending_is_empty_and_close_keeps_the_mask() -> None:
    code = (f"import signal, sys\nsys.path.insert(0, {str(REPO)!r})\n"
            "from agent.kernel.signalfd import SignalWatch, UNEXPECTED\n"
            "w = SignalWatch()\nassert w.read() == []\nw.close()\nw.close()\n"
            "assert set(UNEXPECTED) <= signal.pthread_sigmask(signal.SIG_BLOCK, [])\n"
            "assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
