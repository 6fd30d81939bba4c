"""The Buildroot external tree in recipes/buildroot-external.

A subset of Buildroot's utils/check-package rules is re-implemented here,
following checkpackagelib (lib.py, lib_mk.py, lib_config.py, lib_hash.py,
lib_sysv.py); each rule is also shown to fire on a bad sample.  The start
script is then run for real with BusyBox' sh and start-stop-daemon.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
EXT = REPO / "recipes/buildroot-external"
Rule = Callable[[str, list[str]], list[str]]

# --------------------------------------------------------------- common (lib.py)


def common(name: str, lines: list[str]) -> list[str]:
    out = []
    for i, line in enumerate(lines, 1):
        if line.rstrip("\n") != line.rstrip("\n").rstrip():
            out.append(f"{name}:{i}: line contains trailing whitespace")
        if i > 1 and line.strip() == "" and lines[i - 2].strip() == "":
            out.append(f"{name}:{i}: consecutive empty lines")
    if lines and lines[-1].strip() == "":
        out.append(f"{name}:{len(lines)}: empty line at end of file")
    if lines and not lines[-1].endswith("\n"):
        out.append(f"{name}:{len(lines)}: missing newline at end of file")
    return out


# ----------------------------------------------------------------- .mk (lib_mk.py)
_COND = re.compile(r"^\s*(ifdef|ifeq|ifndef|ifneq|elif|else|endif)\s")
_BACKSLASH = re.compile(r"^[^#].*\\$")


def mk_rules(name: str, lines: list[str]) -> list[str]:
    out: list[str] = []
    pkg = Path(name).stem.replace("-", "_").upper()
    # PackageHeader
    if not lines or not lines[0].startswith("include "):
        for n, want in ((1, "#" * 80), (2, "#"), (4, "#"), (5, "#" * 80), (6, "")):
            if len(lines) < n or lines[n - 1].rstrip() != want:
                out.append(f"{name}:{n}: bad package header")
    define = backslash = target = False
    for i, raw in enumerate(lines, 1):
        text = raw.rstrip("\n")
        # Indent
        if re.search(r"^\s*define\s", text):
            define = True
        elif re.search(r"^\s*endef", text):
            define = False
        else:
            expect_tabs = (define or backslash or target) and not (
                not backslash and _COND.search(text))
            backslash = bool(_BACKSLASH.search(text))
            if re.search(r"^[^# \t]+:\s", text):
                target = True
            elif text.strip() == "":
                target = False
            elif not (define and text.lstrip().startswith("#")):
                if expect_tabs and not text.startswith("\t"):
                    out.append(f"{name}:{i}: expected indent with tabs")
                if not expect_tabs and text.startswith("\t"):
                    out.append(f"{name}:{i}: unexpected indent with tabs")
        # SpaceBeforeBackslash
        if re.match(r"^.*(  |\t ?)\\$", text.rstrip()):
            out.append(f"{name}:{i}: use only one space before backslash")
        # TrailingBackslash
        if i < len(lines) and _BACKSLASH.search(text) and lines[i].strip() == "":
            out.append(f"{name}:{i}: remove trailing backslash")
        # TypoInPackageVariable
        m = re.search(r"^(define\s+)?([A-Z0-9_]+_[A-Z0-9_]+)", text)
        if m and not re.search(rf"(HOST_|ROOTFS_)?({pkg}_[A-Z0-9_]+)", text):
            out.append(f"{name}:{i}: possible typo: {m.group(2)} -> *{pkg}*")
        # UselessFlag
        if re.search(r"_(INSTALL_IMAGES\s*=\s*NO|INSTALL_REDISTRIBUTE\s*=\s*YES|"
                     r"INSTALL_STAGING\s*=\s*NO|INSTALL_TARGET\s*=\s*YES)", text):
            out.append(f"{name}:{i}: useless default value")
        # VariableWithBraces
        if re.match(r"^[^#].*[^$]\${\w+}", text.rstrip()):
            out.append(f"{name}:{i}: use $() to delimit variables, not ${{}}")
        # RemoveDefaultPackageSourceVariable
        base = Path(name).stem
        if re.search(rf"^{pkg}_SOURCE\s*=\s*{base}-\$\({pkg}_VERSION\)\.tar\.gz", text):
            out.append(f"{name}:{i}: remove default value of _SOURCE variable")
    return out


# ------------------------------------------------------- Config.in (lib_config.py)
_NOT_INDENTED = ["choice", "comment", "config", "endchoice", "endif", "endmenu", "if",
                 "menu", "menuconfig", "source"]
_INDENTED = ["bool", "default", "depends", "help", "prompt", "select", "string"]
_ORDER = {"bool": 1, "prompt": 1, "string": 1, "default": 2, "depends": 3, "select": 4,
          "help": 5}


def config_rules(name: str, lines: list[str]) -> list[str]:
    out: list[str] = []
    state = 0
    help_text = first = False
    seen: dict[str, int] = {}
    for i, raw in enumerate(lines, 1):
        text = raw.rstrip("\n")
        if text.strip() == "" or text.strip().startswith("#"):
            continue
        entry = text.split()[0]
        in_help = text.startswith("\t  ")
        if not in_help:
            # AttributesOrder
            if entry in _NOT_INDENTED:
                state = 0
            elif entry in _ORDER:
                if state > _ORDER[entry]:
                    out.append(f"{name}:{i}: attributes order: type, default, depends on, "
                               "select, help")
                state = _ORDER[entry]
            # Indent
            if entry in _INDENTED and not text.startswith(f"\t{entry}"):
                out.append(f"{name}:{i}: should be indented with one tab")
            if entry in _NOT_INDENTED and not text.startswith(entry):
                out.append(f"{name}:{i}: should not be indented")
            # NoDefaultN
            if re.match(r"^\tdefault n$", text.split("#")[0].rstrip()):
                out.append(f"{name}:{i}: 'default n' is redundant")
            # RedefinedConfig (without the if/endif scoping)
            m = re.search(r"^\s*(menu|)config\s+(BR2_\w+)\b", text)
            if m:
                if m.group(2) in seen:
                    out.append(f"{name}:{i}: config {m.group(2)} redeclared")
                seen[m.group(2)] = i
        # HelpText
        if entry in _NOT_INDENTED:
            help_text = False
            continue
        if text.strip() == "help":
            help_text = first = True
            continue
        if help_text:
            fmt = r"^\t  \S.{,61}$" if first else r"^\t  .{,62}$"
            first = False
            if not re.match(fmt, text.rstrip()) and not re.match(
                    r"^(http|https|git)://\S*$", text.strip()):
                out.append(f"{name}:{i}: help text: <tab><2 spaces><62 chars>")
    return out


# ------------------------------------------------------------ .hash (lib_hash.py)
_HASH_LEN = {"md5": 32, "sha1": 40, "sha224": 56, "sha256": 64, "sha384": 96, "sha512": 128}


def hash_rules(name: str, lines: list[str]) -> list[str]:
    out: list[str] = []
    for i, raw in enumerate(lines, 1):
        text = raw.rstrip("\n")
        if text.strip() == "" or text.startswith("#"):
            continue
        fields = text.split()
        if len(fields) != 3:
            out.append(f"{name}:{i}: expected three fields")
            continue
        htype, hexa, _ = fields
        if htype not in _HASH_LEN:
            out.append(f"{name}:{i}: unexpected type of hash")
        elif not re.match(rf"^[0-9A-Fa-f]{{{_HASH_LEN[htype]}}}$", hexa):
            out.append(f"{name}:{i}: hash size does not match type")
        if not re.match(re.escape("{}  {}  {}".format(*fields)), text):
            out.append(f"{name}:{i}: separation does not match expectation")
    return out


# ---------------------------------------------------------- S-script (lib_sysv.py)


def sysv_rules(name: str, lines: list[str]) -> list[str]:
    out: list[str] = []
    daemon = None
    for i, raw in enumerate(lines, 1):
        text = raw.rstrip()
        if re.search(r"^[\t]* ", text):
            out.append(f"{name}:{i}: should be indented with tabs")
        m = re.search(r"^DAEMON=[\"']{0,1}([^\"']*)[\"']{0,1}", text)
        if m:
            if daemon:
                out.append(f"{name}:{i}: DAEMON variable redefined")
            daemon = m.group(1)
            if "/" in daemon:
                out.append(f"{name}:{i}: Do not include path in DAEMON")
                daemon = os.path.basename(daemon)
        m = re.search(r"^PIDFILE=[\"']{0,1}([^\"']*)[\"']{0,1}", text)
        if m and not re.match(r"/var/run/(\$DAEMON|\$\{DAEMON\}).pid", m.group(1)):
            out.append(f"{name}:{i}: Incorrect PIDFILE value")
    if daemon is None:
        out.append(f"{name}:0: DAEMON variable not defined")
    elif not re.match(rf"S\d\d{daemon}$", Path(name).name):
        out.append(f"{name}:0: filename should be S<number><number><daemon name>")
    return out


def _check(path: Path, rule: Rule) -> list[str]:
    lines = path.read_text().splitlines(keepends=True)
    return common(str(path.relative_to(REPO)), lines) + rule(str(path.relative_to(REPO)), lines)


FILES: list[tuple[Path, Rule]] = []
for _glob, _rule in (("package/*/*.mk", mk_rules), ("Config.in", config_rules),
                     ("package/*/Config.in", config_rules), ("package/*/*.hash", hash_rules),
                     ("package/*/S[0-9][0-9]*", sysv_rules)):
    FILES.extend((p, _rule) for p in sorted(EXT.glob(_glob)))


@pytest.mark.parametrize(("path", "rule"), FILES, ids=[str(p.relative_to(EXT)) for p, _ in FILES])
def test_check_package(path: Path, rule: Rule) -> None:
    assert _check(path, rule) == []
    if path.parent.parent.name == "package":  # NotExecutable: .mk installs with $(INSTALL)
        assert not path.stat().st_mode & stat.S_IXUSR, f"{path} must not be executable"


BAD_SAMPLES: list[tuple[Rule, str, str]] = [
    (mk_rules, "package/foo/foo.mk", "FOO_VERSION = 1\n"),
    (mk_rules, "package/foo/foo.mk", "#" * 80 + "\n#\n# foo\n#\n" + "#" * 80 + "\n\n"
     "FOO_VERSION = 1\nBAR_SITE = x\n"),
    (mk_rules, "package/foo/foo.mk", "#" * 80 + "\n#\n# foo\n#\n" + "#" * 80 + "\n\n"
     "FOO_DEPENDENCIES = a  \\\n\tb\n"),
    (config_rules, "Config.in", "config BR2_PACKAGE_FOO\n\tbool \"foo\"\n\thelp\n\tno spaces\n"),
    (config_rules, "Config.in", "config BR2_PACKAGE_FOO\n\tselect BR2_X\n\tbool \"foo\"\n"),
    (config_rules, "Config.in", "config BR2_PACKAGE_FOO\n    bool \"foo\"\n"),
    (config_rules, "Config.in", "config BR2_PACKAGE_FOO\n\tbool \"foo\"\n\tdefault n\n"),
    (hash_rules, "foo.hash", "sha256 " + "0" * 64 + " foo.tar.gz\n"),
    (hash_rules, "foo.hash", "sha256  " + "0" * 63 + "  foo.tar.gz\n"),
    (sysv_rules, "S50foo", "DAEMON=\"/usr/bin/foo\"\n"),
    (sysv_rules, "S50foo", "DAEMON=\"foo\"\nPIDFILE=\"/run/foo.pid\"\n"),
    (sysv_rules, "S50bar", "DAEMON=\"foo\"\n  start\n"),
]


@pytest.mark.parametrize(("rule", "name", "text"), BAD_SAMPLES)
def test_rules_fire_on_bad_samples(rule: Rule, name: str, text: str) -> None:
    assert rule(name, text.splitlines(keepends=True))


def _vars(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Z0-9_]+)\s*[+:?]?=\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def test_agent_mk_conventions() -> None:
    mk = EXT / "package/agent/agent.mk"
    v = _vars(mk)
    for key in ("VERSION", "SITE", "SITE_METHOD", "SETUP_TYPE", "LICENSE", "LICENSE_FILES"):
        assert f"AGENT_{key}" in v, key
    assert v["AGENT_SETUP_TYPE"] in ("setuptools", "pep517")
    assert v["AGENT_LICENSE"] == "Apache-2.0"
    assert mk.read_text().splitlines()[-1] == "$(eval $(python-package))"
    assert "LICENSE" in (EXT / "package/agent/agent.hash").read_text()
    # A pinned source that does not depend on where the tree sits (a BSP copies it), the
    # same commit as the Yocto recipe's SRCREV; AGENT_OVERRIDE_SRCDIR is for developers.
    from test_recipes_yocto import pinned_srcrev
    assert v["AGENT_SITE_METHOD"] == "git"
    assert "BR2_EXTERNAL" not in v["AGENT_SITE"] and v["AGENT_SITE"].startswith("https://")
    assert v["AGENT_VERSION"] == pinned_srcrev()
    cg = _vars(EXT / "package/python-cgroupspy/python-cgroupspy.mk")
    assert cg["PYTHON_CGROUPSPY_SETUP_TYPE"] == "setuptools"
    assert (EXT / "package/python-cgroupspy/python-cgroupspy.mk").read_text().splitlines()[-1] \
        == "$(eval $(python-package))"


def test_tree_layout() -> None:
    desc = (EXT / "external.desc").read_text()
    assert re.search(r"^name: AGENT$", desc, re.M)
    assert "BR2_EXTERNAL_AGENT_PATH" in (EXT / "external.mk").read_text()
    top = (EXT / "Config.in").read_text()
    for pkg in ("agent", "python-cgroupspy"):
        assert f'source "$BR2_EXTERNAL_AGENT_PATH/package/{pkg}/Config.in"' in top
    cfg = (EXT / "package/agent/Config.in").read_text()
    assert re.search(r"^config BR2_PACKAGE_AGENT\n\tbool \"agent\"$", cfg, re.M)
    for sym in ("BR2_PACKAGE_PYTHON_PYROUTE2", "BR2_PACKAGE_PYTHON_CBOR2",
                "BR2_PACKAGE_PYTHON3_ZLIB"):
        assert re.search(rf"^\tselect {sym}\b", cfg, re.M), sym
    assert re.search(r"^\tdepends on BR2_PACKAGE_PYTHON3$", cfg, re.M)
    assert re.search(r"^\tselect BR2_PACKAGE_PYTHON_CGROUPSPY\b", cfg, re.M)


def test_s_script_form() -> None:
    text = (EXT / "package/agent/S50agentd").read_text()
    assert re.search(r"^\tstart\|stop\|restart\)$", text, re.M)
    assert re.search(r"^\treload\)$", text, re.M)
    assert '. "/etc/default/$DAEMON"' in text
    for fn in ("start", "stop", "restart"):
        assert re.search(rf"^{fn}\(\) {{$", text, re.M), fn
    # stopped by pid file only: a Python daemon's /proc/PID/exe is the interpreter
    stops = [ln for ln in text.splitlines() if "--stop" in ln]
    assert stops and all('--pidfile "$PIDFILE"' in ln and "--exec" not in ln for ln in stops)
    assert "printf 'Starting %s: '" in text and 'echo "OK"' in text and 'echo "FAIL"' in text


# --------------------------------------------------- the S-script, run for real

# agentd as the script sees it: FAKE_SLOW_START seconds before it takes the lock (Python
# starting on a loaded box), then the lock, the socket bound and the pid file, then
# FAKE_SLOW_SERVE seconds of start-up (journal replay, adoption) before it answers;
# FAKE_FAIL makes it log that line and exit 1 where it would take the lock.
FAKE_AGENTD = """#!{python}
import os, signal, socket, sys, time
arg = lambda name: sys.argv[sys.argv.index(name) + 1]
pidfile, sockpath, state = arg("--pidfile"), arg("--socket"), arg("--state-dir")
def bye(*_):
    if open(pidfile).read().strip() == str(os.getpid()):
        os.unlink(pidfile)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
time.sleep(float(os.environ.get("FAKE_SLOW_START", "0")))
if os.environ.get("FAKE_FAIL"):
    print(os.environ["FAKE_FAIL"], file=sys.stderr)
    sys.exit(1)
os.makedirs(state, exist_ok=True)
open(os.path.join(state, "agentd.lock"), "w").write(f"{{os.getpid()}}\\n")
srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
if os.path.exists(sockpath):
    os.unlink(sockpath)
srv.bind(sockpath)
srv.listen(8)
os.makedirs(os.path.dirname(pidfile), exist_ok=True)
open(pidfile + ".tmp", "w").write(f"{{os.getpid()}}\\n")
os.replace(pidfile + ".tmp", pidfile)
print("agentd args", sys.argv[1:], file=sys.stderr, flush=True)
time.sleep(float(os.environ.get("FAKE_SLOW_SERVE", "0")))
while True:
    conn, _ = srv.accept()
    try:  # an agentctl that gave up has gone: no reply to send
        if conn.recv(64):
            conn.send(b"ok")
    except OSError:
        pass
    conn.close()
"""
# agentctl --socket PATH --timeout S status: 0 when agentd answers, 3 when it cannot be
# reached, 4 when no answer comes in time (agentctl's exit codes).
FAKE_AGENTCTL = """#!{python}
import socket, sys
arg = lambda name: sys.argv[sys.argv.index(name) + 1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(float(arg("--timeout")))
try:
    s.connect(arg("--socket"))
    s.send(b"status")
    sys.exit(0 if s.recv(64) == b"ok" else 4)
except TimeoutError:
    sys.exit(4)
except OSError:
    sys.exit(3)
"""


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """rootfs-overlay's S50agentd with its paths under ``tmp_path``, with BusyBox's
    start-stop-daemon and setsid, and a fake agentd and agentctl."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.fail("busybox is not installed: ./dev test installs it (busybox-static)")
    for d in ("bin", "sbin", "log", "default"):  # no run/: the box has no /var/run
        (tmp_path / d).mkdir()
    for applet in ("start-stop-daemon", "setsid"):
        os.symlink(busybox, tmp_path / "sbin" / applet)
    for name, text in (("agentd", FAKE_AGENTD), ("agentctl", FAKE_AGENTCTL)):
        (tmp_path / "bin" / name).write_text(text.format(python=sys.executable))
        (tmp_path / "bin" / name).chmod(0o755)
    sock = tmp_path / "agentd.sock"
    (tmp_path / "default/agentd").write_text(
        f'STATEDIR="{tmp_path}/state"\nSOCKET="{sock}"\n'
        f'AGENTD_ARGS="--log-level debug --socket {sock} --state-dir {tmp_path}/state"\n')
    script = (REPO / "rootfs-overlay/etc/init.d/S50agentd").read_text()
    script = (script.replace("/usr/bin/", f"{tmp_path}/bin/")
              .replace("/var/run/", f"{tmp_path}/run/")
              .replace("/var/log/", f"{tmp_path}/log/")
              .replace("/etc/default/", f"{tmp_path}/default/"))
    (tmp_path / "S50agentd").write_text(script)
    return tmp_path


def _run(box: Path, action: str, **env: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{box}/sbin:/usr/sbin:/usr/bin:/sbin:/bin", **env}
    return subprocess.run(["busybox", "sh", str(box / "S50agentd"), action], env=env,
                          capture_output=True, text=True, timeout=60)


def _answers(box: Path, timeout: float = 1.0) -> bool:
    r = subprocess.run([str(box / "bin/agentctl"), "--socket", str(box / "agentd.sock"),
                        "--timeout", str(timeout), "status"])
    return r.returncode == 0


def _live_agentds(box: Path) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(box / "bin/agentd").encode() in (p / "cmdline").read_bytes().split(b"\0"):
                    out.append(int(p.name))
            except OSError:
                pass
    return [p for p in out if _alive(p)]


@pytest.fixture
def box(sandbox: Path) -> Iterator[Path]:
    """The sandbox, with every fake agentd it started killed at the end."""
    try:
        yield sandbox
    finally:
        for pid in _live_agentds(sandbox):
            os.kill(pid, signal.SIGKILL)


def _pid(box: Path) -> int:
    for _ in range(100):
        try:
            return int((box / "run/agentd.pid").read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError("no pid file")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_s_script_runs_with_busybox(sandbox: Path) -> None:
    pids: list[int] = []
    try:
        r = _run(sandbox, "start")
        assert r.returncode == 0 and r.stdout == "Starting agentd: OK\n", r
        pid = _pid(sandbox)
        pids.append(pid)
        assert _alive(pid)
        deadline = time.monotonic() + 10
        while "agentd args" not in _read(sandbox / "log/agentd.log"):
            assert time.monotonic() < deadline, "agentd's stderr is not in the log file"
            time.sleep(0.05)
        # the shell exec'd agentd: the pid in the pid file is agentd's own
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert str(sandbox / "bin/agentd").encode() in cmdline
        assert b"--log-level" in cmdline  # /etc/default/agentd was read
        assert _pid(sandbox) == pid

        r = _run(sandbox, "start")  # a second start leaves the first alone
        assert r.returncode == 0 and "already running" in r.stdout
        assert _pid(sandbox) == pid

        r = _run(sandbox, "restart")
        assert r.returncode == 0 and r.stdout.startswith("Stopping agentd: OK\n")
        assert not _alive(pid)
        new = _pid(sandbox)
        pids.append(new)
        assert new != pid and _alive(new)

        r = _run(sandbox, "stop")
        assert r.returncode == 0 and r.stdout == "Stopping agentd: OK\n"
        assert not _alive(new) and not (sandbox / "run/agentd.pid").exists()

        r = _run(sandbox, "stop")
        assert r.returncode != 0 and r.stdout == "Stopping agentd: FAIL\n"
        r = _run(sandbox, "bogus")
        assert r.returncode == 1 and r.stdout.startswith("Usage:")
    finally:
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


SLOW_STARTS = {
    # Python's start-up on a loaded box, longer than any fixed grace, before agentd can
    # be seen through its lock or pid file (the run directory does not exist yet)
    "slow to lock": {"FAKE_SLOW_START": "3"},
    # bound and pid file written, but still replaying and adopting before it serves
    "slow to serve": {"FAKE_SLOW_SERVE": "3"},
}


@pytest.mark.parametrize("slow", SLOW_STARTS.values(), ids=SLOW_STARTS.keys())
def test_s_script_slow_start_is_no_failure(box: Path, slow: dict[str, str]) -> None:
    t0 = time.monotonic()
    r = _run(box, "start", **slow)
    took = time.monotonic() - t0
    log = _read(box / "log/agentd.log")
    assert (r.returncode, r.stdout) == (0, "Starting agentd: OK\n"), (r, log)
    assert took >= 3  # it waited for agentd, however long that took
    assert _answers(box, timeout=0.5), "start said OK before agentd answered on its socket"
    r = _run(box, "stop")
    assert r.returncode == 0 and not _live_agentds(box)


def test_s_script_says_why_agentd_failed(box: Path) -> None:
    why = "agentd: error[E_CONFIG]: /etc/agent/agentd.toml: bad value"
    r = _run(box, "start", FAKE_FAIL=why, FAKE_SLOW_START="1")
    assert r.returncode == 1
    assert r.stdout == (f"Starting agentd: FAIL (agentd exited with status 1: {why}; "
                        f"see {box}/log/agentd.log)\n"), r
    # a second failure names its own reason, not the first one's
    r = _run(box, "start", FAKE_FAIL="agentd: second")
    assert r.returncode == 1 and "status 1: agentd: second;" in r.stdout, r


def test_s_script_still_starting_is_said_as_such(box: Path) -> None:
    with (box / "default/agentd").open("a") as f:
        f.write("START_WAIT=2\n")
    r = _run(box, "start", FAKE_SLOW_SERVE="6")
    pid = _pid(box)
    assert r.returncode == 0 and "FAIL" not in r.stdout, r
    assert r.stdout == (f"Starting agentd: still starting after 2 s (pid {pid}, no answer on "
                        f"{box}/agentd.sock yet; see {box}/log/agentd.log)\n"), r
    assert _answers(box, timeout=10)  # and it does come up


# ---------------------------------- the package's configuration, with the agent enabled
#
# What `make BR2_EXTERNAL=... defconfig` works out for the external tree, computed by
# kconfiglib (a Python implementation of the kernel's Kconfig, which Buildroot's menus
# are written in) over the tree's Config.in and the Buildroot symbols it selects or
# depends on, defined here as Buildroot defines them (package/*/Config.in).  The symbols
# come in two sets: 2025.02 LTS, where nftables builds `nft -j` (JSON) when jansson is
# enabled, and the newest release, where BR2_PACKAGE_NFTABLES_JSON asks for it.

BUILDROOT_SYMBOLS = """\
# toolchain properties: hidden in Buildroot (set by the toolchain's choices), given a
# prompt here so that the defconfig below can set them
config BR2_USE_MMU
	bool "toolchain: MMU"
config BR2_USE_WCHAR
	bool "toolchain: wchar"
config BR2_TOOLCHAIN_HAS_THREADS
	bool "toolchain: threads"
config BR2_STATIC_LIBS
	bool "toolchain: static libraries only"
config BR2_TOOLCHAIN_HEADERS_AT_LEAST_3_12
	bool "toolchain: kernel headers >= 3.12"
config BR2_PACKAGE_LIBFFI
	bool
config BR2_PACKAGE_PYTHON3
	bool "python3"
	depends on BR2_USE_WCHAR
	depends on BR2_USE_MMU
	depends on BR2_TOOLCHAIN_HAS_THREADS
	depends on !BR2_STATIC_LIBS
	select BR2_PACKAGE_LIBFFI
if BR2_PACKAGE_PYTHON3
config BR2_PACKAGE_PYTHON3_ZLIB
	bool "zlib module"
config BR2_PACKAGE_PYTHON3_DECIMAL
	bool "decimal module"
endif
config BR2_PACKAGE_PYTHON_CBOR2
	bool "python-cbor2"
config BR2_PACKAGE_PYTHON_PYROUTE2
	bool "python-pyroute2"
config BR2_PACKAGE_LIBMNL
	bool "libmnl"
config BR2_PACKAGE_LIBNFTNL
	bool "libnftnl"
	depends on BR2_TOOLCHAIN_HEADERS_AT_LEAST_3_12
	select BR2_PACKAGE_LIBMNL
config BR2_PACKAGE_JANSSON
	bool "jansson"
config BR2_PACKAGE_NFTABLES
	bool "nftables"
	depends on BR2_USE_WCHAR
	depends on BR2_TOOLCHAIN_HEADERS_AT_LEAST_3_12
	select BR2_PACKAGE_LIBMNL
	select BR2_PACKAGE_LIBNFTNL
config BR2_LINUX_KERNEL
	bool "Linux Kernel"
config BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES
	string "Additional configuration fragment files"
	depends on BR2_LINUX_KERNEL
"""
NFTABLES_JSON = """\
if BR2_PACKAGE_NFTABLES
config BR2_PACKAGE_NFTABLES_JSON
	bool "json support"
	select BR2_PACKAGE_JANSSON
endif
"""
BUILDROOT_RELEASES = {
    # release: (extra symbols, the symbol that makes nftables build with JSON support)
    "2025.02": ("", "BR2_PACKAGE_JANSSON"),
    "2026.05": (NFTABLES_JSON, "BR2_PACKAGE_NFTABLES_JSON"),
}
# A glibc toolchain (what Bootlin's and the internal toolchains give) and python3.
DEFCONFIG = """\
BR2_USE_MMU=y
BR2_USE_WCHAR=y
BR2_TOOLCHAIN_HAS_THREADS=y
BR2_TOOLCHAIN_HEADERS_AT_LEAST_3_12=y
BR2_PACKAGE_PYTHON3=y
BR2_PACKAGE_AGENT=y
"""


def br_config(tmp_path: Path, release: str, defconfig: str = DEFCONFIG) -> Any:
    """The configuration `make defconfig` makes of ``defconfig`` with this tree."""
    try:
        import kconfiglib
    except ImportError:
        pytest.fail("kconfiglib is not installed: it is in the test extra (pip install kconfiglib)")
    extra, _ = BUILDROOT_RELEASES[release]
    top = tmp_path / "Config.in"
    # Buildroot sources each external tree's Config.in in a menu of its own.
    top.write_text(BUILDROOT_SYMBOLS + extra + 'menu "External options"\n'
                   'source "$BR2_EXTERNAL_AGENT_PATH/Config.in"\nendmenu\n')
    (tmp_path / "defconfig").write_text(defconfig)
    # Buildroot's symbols have no CONFIG_ prefix in .config and defconfigs
    env = {"BR2_EXTERNAL_AGENT_PATH": str(EXT), "CONFIG_": ""}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        kconf = kconfiglib.Kconfig(str(top), warn_to_stderr=False)
        kconf.load_config(str(tmp_path / "defconfig"))
        kconf.write_config(str(tmp_path / ".config"))  # evaluates every symbol, as conf does
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert not [w for w in kconf.warnings if "malformed" in w or "undefined" in w], kconf.warnings
    return kconf


@pytest.mark.parametrize("release", BUILDROOT_RELEASES)
def test_config_with_the_agent_selects_its_runtime(tmp_path: Path, release: str) -> None:
    kconf = br_config(tmp_path, release)
    value = {name: sym.str_value for name, sym in kconf.syms.items()}
    assert value["BR2_PACKAGE_AGENT"] == "y", kconf.warnings
    _, json_symbol = BUILDROOT_RELEASES[release]
    wanted = ["BR2_PACKAGE_NFTABLES", json_symbol, "BR2_PACKAGE_PYTHON_PYROUTE2",
              "BR2_PACKAGE_PYTHON_CBOR2", "BR2_PACKAGE_PYTHON3_ZLIB",
              "BR2_PACKAGE_PYTHON3_DECIMAL"]
    off = [s for s in wanted if value[s] != "y"]
    assert not off, f"with BR2_PACKAGE_AGENT=y these stay off: {off}"
    assert value["BR2_PACKAGE_AGENT_CGROUP_V1"] == "n"
    # a select that overrides its target's dependencies is what `make` warns about
    unmet = [w for w in kconf.warnings if "unmet direct dependencies" in w]
    assert not unmet, unmet


def test_config_tools_match_the_yocto_table(tmp_path: Path) -> None:
    """Every tool the agent runs (TOOLS in test_recipes_yocto.py) is selected."""
    from test_recipes_yocto import TOOLS
    kconf = br_config(tmp_path, "2025.02")
    for tool, (_, symbol) in TOOLS.items():
        assert kconf.syms[symbol].str_value == "y", f"{tool}: {symbol} is not selected"


def test_config_agent_needs_what_nftables_needs(tmp_path: Path) -> None:
    """Without kernel headers >= 3.12 nftables cannot be built: the agent is not offered
    (select would force it on and break the build), and its comment says why."""
    kconf = br_config(tmp_path, "2025.02",
                      DEFCONFIG.replace("BR2_TOOLCHAIN_HEADERS_AT_LEAST_3_12=y\n", ""))
    assert kconf.syms["BR2_PACKAGE_AGENT"].str_value == "n"
    assert kconf.syms["BR2_PACKAGE_NFTABLES"].str_value == "n"
    cfg = (EXT / "package/agent/Config.in").read_text()
    assert re.search(r'^comment "agent needs .*headers >= 3\.12"$', cfg, re.M)


def test_clean_bsp_buildroot(tmp_path: Path) -> None:
    """docs/firmware.md's Buildroot lines, on a board defconfig with a kernel: the agent,
    its runtime and the kernel fragment, which exists."""
    from test_recipes_yocto import clean_bsp_blocks
    lines = [x for block in clean_bsp_blocks("Buildroot") for x in block
             if re.match(r"^BR2_\w+=", x)]
    assert "BR2_PACKAGE_AGENT=y" in lines, lines
    board = DEFCONFIG.replace("BR2_PACKAGE_PYTHON3=y\nBR2_PACKAGE_AGENT=y\n", "")
    kconf = br_config(tmp_path, "2025.02", board + "BR2_LINUX_KERNEL=y\n" + "\n".join(lines))
    for sym in ("BR2_PACKAGE_AGENT", "BR2_PACKAGE_NFTABLES", "BR2_PACKAGE_PYTHON_PYROUTE2",
                "BR2_PACKAGE_PYTHON_CBOR2"):
        assert kconf.syms[sym].str_value == "y", sym
    fragments = kconf.syms["BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES"].str_value
    assert fragments, "the kernel fragment is not set"
    for f in fragments.split():
        path = Path(f.replace("$(BR2_EXTERNAL_AGENT_PATH)", str(EXT)))
        assert path.is_file(), f
