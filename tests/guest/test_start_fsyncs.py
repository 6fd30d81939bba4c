"""How many fsyncs one cell start and one stop cost agentd (a count, not a time).

Every fsync/fdatasync is a flash write barrier on a set-top box, and under emulation a
few ms each: the start path's count is bounded here so that a regression (one more
synced record per plan step, say) fails a test.  Counted with the kernel's syscall
tracepoints (tracefs), for agentd's threads only (``record-tgid``), by file.

The bounds are the journal's counts measured when this test was written (issue 14:
the journal syncs every record of a plan, ``op-done`` included): 14 for a start and 12
for a stop of a networked cell; lower them when the journal batches its syncs.  The
event log's own syncs (a batch holding a state change is synced; how records fall into
batches depends on timing) are counted and printed, not bounded.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cellkit import JOURNAL, SERVICES, agentd_pid, clean, ctl, sh, write_manifest  # noqa: F401  (fixture)

TRACING = Path("/sys/kernel/tracing")
EVENTS = ("sys_enter_fsync", "sys_enter_fdatasync")
LINE = re.compile(r"-(\d+)\s+\(\s*(\d+)\)\s+\[\d+\].*?: sys_(fsync|fdatasync)\(fd: (\w+)\)")
START_MAX = 14  # the journal's, measured: see the module docstring and docs/performance.md
STOP_MAX = 12


@pytest.fixture
def tracer() -> Iterator[Path]:
    mounted = not (TRACING / "events").is_dir()
    if mounted:
        sh("mount", "-t", "tracefs", "nodev", str(TRACING))
    ev = TRACING / "events/syscalls"
    if not all((ev / e / "enable").exists() for e in EVENTS):
        pytest.skip("the box's kernel has no syscall tracepoints (CONFIG_FTRACE_SYSCALLS)")
    (TRACING / "options/record-tgid").write_text("1")
    for e in EVENTS:
        (ev / e / "enable").write_text("1")
    try:
        yield TRACING
    finally:
        for e in EVENTS:
            (ev / e / "enable").write_text("0")
        (TRACING / "tracing_on").write_text("0")
        (TRACING / "trace").write_text("")
        if mounted:
            sh("umount", str(TRACING))


def counted(tracing: Path, pid: int) -> Counter[str]:
    """fsyncs of agentd's threads since the last call, by the file of the fd."""
    (tracing / "tracing_on").write_text("0")
    text = (tracing / "trace").read_text()
    (tracing / "trace").write_text("")
    out: Counter[str] = Counter()
    for m in LINE.finditer(text):
        if int(m.group(2)) != pid:
            continue
        try:
            target = os.readlink(f"/proc/{pid}/fd/{int(m.group(4), 16)}")
        except OSError:
            target = "(closed since)"
        out[f"{m.group(3)} {target}"] += 1
    return out


def test_one_start_and_stop_fsync_count(clean: dict[str, Any], tracer: Path) -> None:  # noqa: F811
    write_manifest("fsy", ["sleep", "100000"], network={"vlan": 100})
    pid = agentd_pid()
    (tracer / "trace").write_text("")
    (tracer / "tracing_on").write_text("1")
    ctl("run", "fsy")
    start = counted(tracer, pid)
    (tracer / "tracing_on").write_text("1")
    ctl("stop", "fsy")
    stop = counted(tracer, pid)
    print(f"fsyncs of one start: {sum(start.values())} {dict(start)}")
    print(f"fsyncs of one stop: {sum(stop.values())} {dict(stop)}")
    (SERVICES / "fsy.toml").unlink()
    figures = {"start": dict(start), "stop": dict(stop)}
    # the records' syncs (fdatasync); a compaction's fsync of its new file, should the
    # journal reach its size limit in the window, is the compaction's cost, not the start's
    assert start[f"fdatasync {JOURNAL}"] > 0  # the control: the tracepoints see agentd's
    assert start[f"fdatasync {JOURNAL}"] <= START_MAX, figures
    assert stop[f"fdatasync {JOURNAL}"] <= STOP_MAX, figures
