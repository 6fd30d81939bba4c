"""What a cell controls reaches the operator's terminal escaped (issue 10, terminal safety).

In the box, for real: a cell prints escape sequences (window title, clipboard write,
cursor moves, a carriage-return fake line, a bidi override, a C1 CSI, bytes that are not
UTF-8) on stdout and stderr; a manifest passes them in the service's arguments; a
command whose path holds them fails to exec, so they reach an event and an error.
``agentctl logs``, ``events``, ``ps``, ``inspect``, ``run --dry-run`` and the error line
of ``run`` show none of them raw.  The control in each case: ``--json`` (and
``logs --raw``) shows they were really there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cellkit import DEMO, SERVICES, call, clean, ctl, logs, sh, start, wait_for, write_manifest

__all__ = ["clean"]

TITLE = "\x1b]0;PWNED-TITLE\x07"
CLIP = "\x1b]52;c;cHduZWQ=\x07"
MOVE = "\x1b[2A\x1b[2K"
BIDI = "\u202e"
C1 = "\u009b"
# Printed by the cell (busybox printf: octal escapes are bytes).
SCRIPT = (r"printf 'title \033]0;PWNED-TITLE\007 end\n'; "
          r"printf 'clip \033]52;c;cHduZWQ=\007 end\n'; "
          r"printf 'moved \033[2A\033[2K up\n'; "
          r"printf 'real line\rFAKE LINE\n'; "
          r"printf 'bidi \342\200\256gnp.exe\n'; "
          r"printf 'c1 \302\233 31m\n'; "
          r"printf 'bytes \377\376 end\n'; "
          r"printf 'tab\there\n'; "
          r"printf 'err \033[31mred\n' >&2; "
          "echo READY; exec sleep 100000")
RAW_MARKS = [TITLE.encode(), CLIP.encode(), MOVE.encode(), b"real line\rFAKE LINE",
             f"bidi {BIDI}gnp.exe".encode(), f"c1 {C1} 31m".encode()]
SHOWN = ["title \\x1b]0;PWNED-TITLE\\x07 end", "clip \\x1b]52;c;cHduZWQ=\\x07 end",
         "moved \\x1b[2A\\x1b[2K up", "real line\\rFAKE LINE", "bidi \\u202egnp.exe",
         "c1 \\u009b 31m", "tab\there", "!err \\x1b[31mred"]
# Never raw on a terminal (a tab only in log lines, where journalctl keeps it too).
FORBIDDEN = [b"\x1b", b"\x07", b"\r", b"\x00", b"\x7f", BIDI.encode(), C1.encode(),
             "\u2028".encode()]
ARG0 = TITLE + BIDI + "a0"
IMG = Path("/var/lib/agent-tests/ttyimage")
EVIL_CMD = "/bin/evil" + TITLE + BIDI + "x"


def agentctl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["agentctl", *args], capture_output=True, timeout=120, cwd="/")


def assert_clean(data: bytes, what: str) -> str:
    found = [m for m in FORBIDDEN if m in data]
    assert not found, f"{what}: raw {found} in {data!r}"
    return data.decode()


@pytest.fixture
def loud(clean: dict[str, Any]) -> Iterator[str]:
    """A running cell that printed every hostile line; its service arguments carry them
    too (``$0`` of its shell, early in the plan's start line)."""
    name = "tty-loud"
    start(name, ["sh", "-c", 'eval "$1"', ARG0, SCRIPT])
    wait_for(lambda: "READY" in logs(name), "the cell's output")
    yield name


def test_logs_are_escaped_and_raw_is_the_control(loud: str) -> None:
    r = agentctl("logs", loud)
    assert r.returncode == 0, r.stderr
    out = assert_clean(r.stdout, "agentctl logs")
    for shown in SHOWN:
        assert shown in out, (shown, out)
    raw_known = _daemon_sends_raw(loud)
    assert ("bytes \\xff\\xfe end" if raw_known else "bytes \ufffd\ufffd end") in out
    # the control: the bytes were really there
    raw = agentctl("logs", loud, "--raw")
    assert raw.returncode == 0, raw.stderr
    for mark in RAW_MARKS:
        assert mark in raw.stdout, (mark, raw.stdout)
    if raw_known:
        assert b"bytes \xff\xfe end\n" in raw.stdout
    js = agentctl("--json", "logs", loud)
    assert js.returncode == 0 and all(32 <= b < 127 or b == 10 for b in js.stdout)
    lines = [x["line"] for x in json.loads(js.stdout)["lines"]]
    assert f"title {TITLE} end" in lines and "real line\rFAKE LINE" in lines


def _daemon_sends_raw(name: str) -> bool:
    try:
        lines = call("logs", name=name, raw=True)["lines"]
    except Exception as exc:  # an agentd without the `raw` argument: E_ARGS
        assert "E_ARGS" in str(getattr(exc, "code", "")) + str(exc), exc
        return False
    return any(isinstance(x.get("raw"), bytes) for x in lines)


def test_manifest_arguments_in_inspect_and_dry_run_are_escaped(loud: str) -> None:
    dry = "tty-dry"  # the same service, not running: what `run --dry-run` would do
    write_manifest(dry, ["sh", "-c", 'eval "$1"', ARG0, SCRIPT])
    try:
        for args in (["inspect", loud], ["run", dry, "--dry-run"]):
            r = agentctl(*args)
            assert r.returncode == 0, r.stderr
            out = assert_clean(r.stdout, f"agentctl {' '.join(args)}")
            assert "\\x1b]0;PWNED-TITLE\\x07\\u202ea0" in out, out
        assert any(ARG0 in x for x in ctl("inspect", loud)["plan"])  # the control
        assert any(ARG0 in x for x in ctl("run", dry, "--dry-run")["plan"])
    finally:
        (SERVICES / f"{dry}.toml").unlink(missing_ok=True)
    r = agentctl("ps")
    assert r.returncode == 0 and loud in assert_clean(r.stdout, "agentctl ps")


@pytest.fixture
def evil_image() -> Iterator[str]:
    """The demo image (hard links) plus an executable that is no program, at a path
    holding a title sequence and a bidi override: its execve fails (ENOEXEC)."""
    shutil.rmtree(IMG, ignore_errors=True)
    IMG.parent.mkdir(parents=True, exist_ok=True)
    sh("cp", "-al", DEMO, str(IMG))
    (IMG / EVIL_CMD.lstrip("/")).write_bytes(b"\x7fELF? no: garbage\n" * 4)
    (IMG / EVIL_CMD.lstrip("/")).chmod(0o755)
    yield str(IMG)
    shutil.rmtree(IMG, ignore_errors=True)


def test_an_exec_failure_naming_a_hostile_path(clean: dict[str, Any], evil_image: str
                                                ) -> None:
    name = "tty-evil"
    write_manifest(name, ["x"], command=EVIL_CMD, image=evil_image)
    try:
        r = agentctl("run", name)
        assert r.returncode == 1, (r.stdout, r.stderr)
        err = assert_clean(r.stderr, "agentctl run's error")
        assert "error[E_" in err and "\\x1b]0;PWNED-TITLE\\x07\\u202ex" in err, err
        # the event's line is cut at 80 columns before the path: it must be clean, and
        # the control says the event really held the sequence
        ev = agentctl("events", "-n", "200", "--cell", name)
        assert ev.returncode == 0, ev.stderr
        assert " failed " in assert_clean(ev.stdout, "agentctl events")
        events = ctl("events", "-n", "200", "--cell", name)
        assert any(TITLE in str(v) for e in events for v in e["attrs"].values()), events
        r = agentctl("inspect", name)  # its error line shows the path, escaped
        out = assert_clean(r.stdout + r.stderr, "agentctl inspect")
        assert r.returncode != 0 or "\\x1b]0;PWNED-TITLE\\x07" in out, out
        r = agentctl("ps")
        assert r.returncode == 0 and assert_clean(r.stdout, "agentctl ps")
    finally:
        (SERVICES / f"{name}.toml").unlink(missing_ok=True)


def test_an_operator_typed_name_is_escaped_in_the_error(clean: dict[str, Any]) -> None:
    r = agentctl("logs", "no" + TITLE + "such")
    assert r.returncode == 1
    err = assert_clean(r.stderr, "agentctl logs' error")
    assert "error[E_" in err and "\\x1b]0;PWNED-TITLE\\x07" in err, err
