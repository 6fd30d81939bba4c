"""Nothing polls when nothing happens: the tuner's quiet cells and its sample reader,
in the box with agentd's default tuner settings (no /etc/agent/tuner.toml).

* :class:`agent.tunerio.SampleReader` re-reads a real cgroup's files through fds kept
  open (kernfs regenerates the text at offset 0): the values move with the cell.
* A cell at its lower bounds is not sampled at all (``agentctl top``: no
  ``sampled_every_s``); a CPU burst under its cpu.max fires its PSI trigger, the tuner
  raises it, and it is sampled again (a raised cell can be lowered again).
The benchmark (bench/run tuner) measures what this saves.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from cellkit import CGROOT, clean, ctl, start, top_rows, wait_for

from agent.kernel.knobs import SampleReader


def test_sample_reader_rereads_a_real_cgroup() -> None:
    leaf = CGROOT / f"agent-test-reader-{os.getpid()}"
    leaf.mkdir()
    proc = None
    reader = None
    try:
        reader = SampleReader(leaf)
        first = reader.read(time.monotonic())
        assert first.memory_current == 0 and first.cpu_usage_usec == 0
        code = ("b = bytearray(16 << 20)\nn = 0\nwhile n < 3_000_000: n += 1\n"
                "print('ok', flush=True)\nimport time; time.sleep(60)")
        proc = subprocess.Popen(["python3", "-c", code], stdout=subprocess.PIPE, text=True,
                                preexec_fn=lambda: (leaf / "cgroup.procs").write_text("0"))
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"
        second = reader.read(time.monotonic())
        assert second.memory_current >= 16 << 20, second
        assert second.cpu_usage_usec > 100_000, second
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        if reader is not None:
            reader.close()
        wait_for(lambda: not (leaf / "cgroup.procs").read_text().strip(), "cgroup empty")
        leaf.rmdir()


@pytest.mark.usefixtures(clean.__name__)
def test_a_cell_at_its_minimum_is_quiet_until_a_burst_raises_it() -> None:
    name = "tq-burst"
    # idle for 20 s, then a busy loop: cpu.max at the minimum (10m) throttles it hard.
    start(name, ["sh", "-c", "sleep 20; while :; do :; done"],
          resources={"cpu_min": "10m", "cpu_max": "500m", "memory_min": "8M",
                     "memory_max": "32M", "pids_max": 8})
    ctl("pin", name, "--cpu", "10m", "--memory", "8M")
    ctl("unpin", name)
    row = top_rows()[name]
    assert row["tuned"] and row["cpu_max"] == 10 and row["memory_max"] == 8 << 20, row
    assert row["sampled_every_s"] is None, row  # at its lower bounds: no samples
    raised = wait_for(lambda: (r := top_rows()[name])["cpu_max"] > 10 and r, "a raise", timeout=90)
    assert raised["sampled_every_s"] is not None, raised  # sampled again: it may be lowered
    evs = ctl("events", "-n", "50", "--channel", "tuner", "--cell", name, "--kind", "resize")
    reasons = {e["attrs"]["reason"] for e in evs if e["attrs"]["action"] == "SetCpuMax"}
    assert "pressure" in reasons, evs  # the PSI trigger, not a sample, noticed the burst

