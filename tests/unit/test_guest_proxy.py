"""The host side of the guest tier: outcomes in the box become outcomes of the host run.

A scratch project is made with the real tests/guest/conftest.py and a stand-in for
qemu/box.py whose run_in_box really runs the guest pytest (in a subprocess, with
AGENT_IN_GUEST=1) instead of booting QEMU.  What is tested is the reporting path:
a failing guest test must fail the host run and show the guest's traceback.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE_BOX = '''
import os, re, shlex, subprocess, sys
from pathlib import Path

def prepare():
    pass

def guest_pytest_script(pytest_args, report):
    return shlex.join(pytest_args) + "\\n" + (report or "")

def run_in_box(script, *, timeout, cpus, mem, verbose, out=None, hostio=None):
    args_line, report = script.split("\\n", 1)
    report = report.replace("/mnt/host", str(hostio))
    env = dict(os.environ, AGENT_IN_GUEST="1", AGENT_GUEST_REPORT=report)
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                        *shlex.split(args_line)], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True)
    if out is not None:
        out.write(r.stdout + r.stderr)
    if os.environ.get("FAKE_BOX_CRASH"):
        Path(report).unlink(missing_ok=True)
        return 125
    return r.returncode
'''

GUEST_TESTS = '''
import pytest

def test_passes():
    assert 1 + 1 == 2

def test_fails():
    value = 41
    assert value == 42, "the box says no"

@pytest.mark.skipif(True, reason="needs a feature the box lacks")
def test_skipped():
    pass

class Missing(AssertionError):
    pass

@pytest.mark.xfail(strict=True, raises=Missing, reason="waits for channel 9")
def test_pending():
    raise Missing("not yet")

@pytest.mark.xfail(strict=True, raises=Missing, reason="waits for channel 8")
def test_landed():
    pass
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "qemu").mkdir()
    (tmp_path / "qemu" / "box.py").write_text(FAKE_BOX)
    guest = tmp_path / "tests" / "guest"
    guest.mkdir(parents=True)
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "tests" / "conftest.py")
    shutil.copy(REPO / "tests" / "guest" / "conftest.py", guest / "conftest.py")
    (guest / "test_example.py").write_text(textwrap.dedent(GUEST_TESTS))
    (tmp_path / "pyproject.toml").write_text(
        "[tool.pytest.ini_options]\nmarkers = ['guest: in the box', 'privileged: root']\n")
    return tmp_path


def host_run(project: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("AGENT_IN_GUEST", "AGENT_GUEST_REPORT", "AGENT_SKIP_GUEST")}
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
                           "tests/guest"], cwd=project, env=environ, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(os.geteuid() != 0, reason="the proxy skips the tier when not root")
def test_guest_outcomes_are_the_host_outcomes(project: Path) -> None:
    r = host_run(project)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 failed, 1 passed, 1 skipped, 1 xfailed" in r.stdout
    assert "PASSED tests/guest/test_example.py::test_passes" in r.stdout
    assert "FAILED tests/guest/test_example.py::test_fails" in r.stdout
    # The guest's own traceback and message are shown on the host.
    assert "[in the box, call]" in r.stdout
    assert "the box says no" in r.stdout
    assert "value = 41" in r.stdout
    assert "in the box: needs a feature the box lacks" in r.stdout
    assert "XFAIL tests/guest/test_example.py::test_pending - in the box: waits for " \
        "channel 9" in r.stdout
    assert "FAILED tests/guest/test_example.py::test_landed" in r.stdout  # it came: XPASS
    assert "[XPASS(strict)] waits for channel 8" in r.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the proxy skips the tier when not root")
def test_box_that_reports_nothing_fails_every_guest_test(project: Path) -> None:
    r = host_run(project, FAKE_BOX_CRASH="1")
    assert r.returncode == 1
    assert "5 failed" in r.stdout
    assert "not run in the box: guest pytest exited with status 125" in r.stdout


def test_skip_switch(project: Path) -> None:
    r = host_run(project, AGENT_SKIP_GUEST="1")
    assert r.returncode == 0, r.stdout
    assert "5 skipped" in r.stdout
    assert "guest tier skipped (AGENT_SKIP_GUEST=1)" in r.stdout


OTHER_TESTS = '''
def test_other_passes():
    pass

def test_other_fails():
    assert "box" == "host"
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="the proxy skips the tier when not root")
def test_two_boxes_report_like_one(project: Path) -> None:
    (project / "tests" / "guest" / "test_other.py").write_text(textwrap.dedent(OTHER_TESTS))
    r = host_run(project, AGENT_BOX_SHARDS="2")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "3 failed, 2 passed, 1 skipped, 1 xfailed" in r.stdout
    assert "FAILED tests/guest/test_other.py::test_other_fails" in r.stdout
    assert "FAILED tests/guest/test_example.py::test_fails" in r.stdout
    assert "box 1: 5 tests" in r.stdout and "box 2: 2 tests" in r.stdout
    assert (project / ".guest-console-1.log").exists()
    assert (project / ".guest-console-2.log").exists()


def load_guest_conftest():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("guest_conftest",
                                                  REPO / "tests" / "guest" / "conftest.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shards_keep_modules_whole_in_order_and_balance_by_weight() -> None:
    guest = load_guest_conftest()
    ids = [f"tests/guest/test_{m}.py::t{i}" for m in ("a", "scale", "b", "isolation", "c")
           for i in range(3)]
    shards = guest.shards_of(ids, 2)
    assert sorted(n for s in shards for n in s) == sorted(ids)
    for shard in shards:
        assert shard == [n for n in ids if n in shard]  # collection order kept
    modules = [{n.split("::")[0] for n in s} for s in shards]
    assert not modules[0] & modules[1]  # whole modules
    # the two heaviest modules go to different boxes
    assert any("tests/guest/test_scale.py" in m for m in modules)
    assert {("tests/guest/test_scale.py" in m, "tests/guest/test_isolation.py" in m)
            for m in modules} == {(True, False), (False, True)}
    assert guest.shards_of(ids, 1) == [ids]
    assert guest.shards_of(ids[:3], 4) == [ids[:3]]  # no empty box


@pytest.mark.skipif(os.geteuid() != 0, reason="the proxy skips the tier when not root")
def test_a_module_that_needs_a_quiet_host_runs_alone_after_the_others(project: Path) -> None:
    guest = project / "tests" / "guest"
    (guest / "test_other.py").write_text(textwrap.dedent(OTHER_TESTS))
    (guest / "test_hostile_cells.py").write_text(
        "import time\n\ndef test_alone():\n    time.sleep(0.1)\n")
    r = host_run(project, AGENT_BOX_SHARDS="2")
    assert "3 failed, 3 passed, 1 skipped, 1 xfailed" in r.stdout, r.stdout + r.stderr
    assert "box 3: 1 tests" in r.stdout, r.stdout
    assert (project / ".guest-console-3.log").exists()
    r = host_run(project, AGENT_BOX_SHARDS="1")  # one box: with the others
    assert "box 1: 8 tests" in r.stdout and "box 2" not in r.stdout, r.stdout


def test_alone_shard_starts_after_the_others(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    guest = load_guest_conftest()
    monkeypatch.setattr(guest, "REPO", tmp_path)  # (the consoles go there)
    monkeypatch.setenv("AGENT_BOX_SHARDS", "2")
    events: list[str] = []

    class Box:
        @staticmethod
        def prepare() -> None:
            pass

        @staticmethod
        def guest_pytest_script(args: list[str], report: str) -> str:
            return " ".join(args)

        @staticmethod
        def run_in_box(script: str, **kw: object) -> int:
            alone = "test_hostile_cells.py" in script
            events.append("start alone" if alone else "start")
            time.sleep(0.05 if alone else 0.3)
            events.append("end alone" if alone else "end")
            return 0

    monkeypatch.setitem(sys.modules, "box", Box)
    tier = guest.Tier(["tests/guest/test_a.py::t", "tests/guest/test_b.py::t",
                       "tests/guest/test_hostile_cells.py::t"])
    tier.result_for("tests/guest/test_hostile_cells.py::t")
    assert events[-2:] == ["start alone", "end alone"]
    assert events.count("end") == 2 and events.index("start alone") > events.index("end")
