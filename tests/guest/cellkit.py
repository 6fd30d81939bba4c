"""The one home of the guest tests' helpers for the live agentd and real cells.

Every guest test module imports what it needs from here, fixtures too: import ``clean``
or ``cgroup_v2_subtree`` (the fixture ``cg``) into a test module to use it.  Everything
runs in the box.

* :func:`sh` runs a command (cwd "/", the agentd log tail in its failure);
  :func:`ctl` runs ``agentctl --json`` and waits out refusals for host pressure,
  :func:`refused` wants a refusal at once and returns its text; :func:`wait_for`
  polls; :func:`ps` lists cells, :func:`top_rows` the tuner's view of them.
* :func:`ensure_agentd`, :func:`restart_agentd`, :func:`kill9_agentd` and
  :func:`kill9_and_restart` manage the box's agentd through /etc/init.d/S50agentd;
  :func:`agentd_settings` runs it for a while with some agentd.toml keys set as asked.
* :func:`leftovers` is everything a cell may leave behind in the box (cgroup leaves,
  links, bridge VLAN entries, root-ns mount points, pinned netns, run dirs, the nftables
  ruleset, cells, leases and open plans in the journal); the ``clean`` fixture checks
  it is exactly as before.
* :func:`write_manifest` writes a test manifest into /etc/agent/services (the root disk
  is a throwaway snapshot); :func:`py_image` builds, once per boot, a cell image with
  the box's own python3 (hard links of /usr, /lib, /bin) so probes inside a cell can
  make exact syscalls through ctypes; :func:`probe` runs a python snippet as a oneshot
  cell and returns what it printed as ``RESULT {json}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from agent.core.seal import Seal
from agent.kernel.seal import seal_tree

if TYPE_CHECKING:
    from agent.kernel.cgroupv2 import CgroupV2

__all__ = [
    "CG",
    "CGROOT",
    "DEMO",
    "JOURNAL",
    "NETNS",
    "PROBES_NOT_FROZEN",
    "PROBE_LIB",
    "RUN_CELLS",
    "SERVICES",
    "WRITABLE",
    "agentd_pid",
    "agentd_settings",
    "call",
    "cgroup_v2_subtree",
    "clean",
    "connect_from",
    "ctl",
    "diff",
    "ensure_agentd",
    "http_get",
    "in_cell_netns",
    "journal_live",
    "kill9_agentd",
    "kill9_and_restart",
    "knob",
    "leftovers",
    "log_tail",
    "logged",
    "logs",
    "manifest_text",
    "mem_events",
    "probe",
    "ps",
    "py_image",
    "refused",
    "restart_agentd",
    "run_until_gone",
    "seal_image",
    "sh",
    "start",
    "start_probe",
    "stop_all",
    "timed_status",
    "top_rows",
    "up",
    "wait_for",
    "warm_up",
    "write_manifest",
]

CGROOT = Path("/sys/fs/cgroup")
CG = CGROOT / "agent"
NETNS = Path("/run/netns")
RUN_CELLS = Path("/run/agent/cells")
PIDFILE = Path("/var/run/agentd.pid")
LOG = Path("/var/log/agentd.log")
SERVICES = Path("/etc/agent/services")
JOURNAL = Path("/var/lib/agent/agent.journal")
CONFIG = Path("/etc/agent/agentd.toml")
DEMO = "/usr/share/agent/images/demo"
# S50agentd start waits up to 120 s (its START_WAIT) for agentd to answer, then returns
# saying it is still starting: more than that before the script itself is a hang.
START_S = 150
PYIMG = Path("/var/lib/agent-tests/pyimage")

# Imported by every probe (python3 -S inside the cell): exact syscalls, errno names.
PROBE_LIB = r'''
import ctypes, errno, json, os, socket, sys
libc = ctypes.CDLL("libc.so.6", use_errno=True)

def call(fn, *args):
    """'ok' or the errno name of a libc call."""
    ctypes.set_errno(0)
    r = fn(*args)
    if r == -1:
        return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
    return "ok"

def oserr(f, *args):
    try:
        f(*args)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def result(d):
    print("RESULT " + json.dumps(d), flush=True)
'''


def log_tail(n: int = 40) -> str:
    try:
        return "\n".join(LOG.read_text().splitlines()[-n:])
    except OSError:
        return "(no log)"


def sh(*argv: str, check: bool = True, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, cwd="/", timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{argv} exited {r.returncode}: {r.stdout}{r.stderr}\n"
                             f"--- agentd log ---\n{log_tail()}")
    return r


def ctl(*args: str, timeout: float = 90, pressure_wait: float = 60) -> Any:
    """``agentctl --json ARGS``, its reply decoded.  A refusal for host pressure says
    "retry later": right after a memory hog this waits (up to ``pressure_wait`` s) for the
    box's PSI average to fall, as an operator would; ``pressure_wait=0`` fails at once."""
    deadline = time.monotonic() + pressure_wait
    while True:
        rc, stdout, stderr = agentctl_here("--json", "--timeout", str(timeout), *args)
        if rc == 0:
            return json.loads(stdout)
        if "E_ADMISSION_PRESSURE" not in stderr or time.monotonic() >= deadline:
            raise AssertionError(f"agentctl {' '.join(args)} exited {rc}: "
                                 f"{stderr}\n--- agentd log ---\n{log_tail()}")
        time.sleep(2)


_CLI = threading.Lock()


def agentctl_here(*args: str) -> tuple[int, str, str]:
    """agentctl's ``main`` (what /usr/bin/agentctl runs) in this process: its exit status,
    stdout and stderr.  The same parsing, requests and output, without starting a Python
    for each call (about a second in the emulated box; hundreds of calls in the tier).
    The installed command itself is run by the tests that read its text (``refused``,
    ``sh("agentctl", ...)``)."""
    from agent.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with _CLI, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as exc:  # argparse's own exits
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def in_cell_netns(cell: str, *argv: str,
                  timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``argv`` run in the cell's network namespace only (a host process there)."""
    return sh("nsenter", f"--net={NETNS / f'cell-{cell}'}", *argv, check=False,
              timeout=timeout)


_CONNECT = """
import socket
s = socket.socket()
s.settimeout({timeout})
try:
    s.connect(({addr!r}, {port}))
    s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    print("ok", s.recv(12).decode(errors="replace"))
except OSError as e:
    print("fail", type(e).__name__, e)
"""


def connect_from(cell: str, addr: str, port: int, timeout: float = 3) -> str:
    """A TCP connect and GET from inside the cell's netns: "ok <first bytes>" or
    "fail <error>" (busybox wget crashes under nsenter here)."""
    r = in_cell_netns(cell, "python3", "-I", "-c",
                      _CONNECT.format(addr=addr, port=port, timeout=timeout))
    return (r.stdout + r.stderr).strip()


def refused(*args: str, timeout: float = 90) -> str:
    """``agentctl ARGS`` must be refused at once (exit 1, no retry for pressure); the
    error it printed."""
    r = sh("agentctl", *args, timeout=timeout, check=False)
    assert r.returncode == 1, (f"agentctl {' '.join(args)} exited {r.returncode}, not 1: "
                               f"{r.stdout}{r.stderr}\n--- agentd log ---\n{log_tail()}")
    return r.stderr


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 20,
             every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}\n--- agentd log ---\n{log_tail()}")


def call(op: str, **args: Any) -> Any:
    """One request through agent.client in this process (what agentctl sends, without
    starting a python per poll: the box is slow at that)."""
    from agent.cli.client import Client

    with Client(timeout=120) as c:
        return c.call(op, **args)


def ps() -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in call("ps")}


def logs(name: str, n: int = 500) -> list[str]:
    return [str(x["line"]) for x in call("logs", name=name, n=n)["lines"]]


def timed_status(timeout: float = 60.0) -> float:
    """agentd must answer ``status`` and ``agentctl status`` must work (within ``timeout``:
    it hangs or errs otherwise); returns the time agentd took, timed through this process's
    client (a new agentctl's own Python start-up in the box, seconds on a loaded host, is
    not agentd's answer), for the test to print.  How fast it answers is a benchmark's
    business (bench/, and the ratio in test_hostile_cells)."""
    t = time.monotonic()
    call("status")
    took = time.monotonic() - t
    sh("agentctl", "status", timeout=timeout)
    return took


def agentd_pid() -> int:
    return int(PIDFILE.read_text().strip())


def up() -> bool:
    """agentd answers a ping."""
    return sh("agentctl", "ping", check=False).returncode == 0


def ensure_agentd() -> None:
    if not up():
        sh("/etc/init.d/S50agentd", "start", timeout=START_S)
        wait_for(up, "agentd ping", timeout=60)


def _stopped() -> bool:
    if not up():
        return True
    sh("/etc/init.d/S50agentd", "stop", check=False)
    return not up()


def restart_agentd() -> None:
    """Stop agentd (asked again until it is down), start it, and wait until it answers
    and its cell manager is up (``status`` has a budget): it reads its config anew."""
    wait_for(_stopped, "agentd to stop", timeout=60, every=1)
    sh("/etc/init.d/S50agentd", "start", timeout=START_S)
    wait_for(up, "agentd ping", timeout=60)
    wait_for(lambda: isinstance(call("status").get("budget"), dict), "the cell manager",
             timeout=60)


@contextlib.contextmanager
def agentd_settings(settings: Mapping[tuple[str, str], Any]) -> Iterator[None]:
    """agentd with each ``[section] key = value`` of ``settings`` in
    /etc/agent/agentd.toml (restarted once if that changes it); afterwards the file as it
    was, and agentd restarted again."""
    from agent.core.config import load_config, parse_config

    original = CONFIG.read_text() if CONFIG.exists() else ""
    before = load_config(CONFIG)
    text = original
    for (section, key), value in settings.items():
        bare = key.replace("_", "").replace("-", "").isalnum()
        line = f"{key if bare else json.dumps(key)} = {json.dumps(value)}\n"
        head = f"[{section}]\n"
        text = (text.replace(head, head + line, 1) if head in text
                else text + "\n" + head + line)
    if parse_config(tomllib.loads(text)) == before:
        yield
        return
    CONFIG.write_text(text)
    try:
        restart_agentd()
        yield
    finally:
        CONFIG.write_text(original)
        restart_agentd()


# Suites that attack from many cells on purpose (one escape call per probe cell) would
# otherwise complete channel 4's escapes-across-cells pattern, whose response (freeze) is
# right for a real campaign but would freeze the third probe before it reports: they run
# with that one pattern's response set to record (tests/guest/test_correlation_box.py
# checks the freeze itself, with the shipped configuration).
PROBES_NOT_FROZEN = {("responses", "correlation/escapes-across-cells"): "record"}


def kill9_agentd() -> int:
    """SIGKILL agentd and wait until it is dead; its pid."""
    pid = agentd_pid()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists()
             or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], "agentd to die",
             timeout=30)
    return pid


def kill9_and_restart() -> None:
    kill9_agentd()
    sh("/etc/init.d/S50agentd", "start", timeout=START_S)
    wait_for(up, "agentd restarted", timeout=60)


def top_rows() -> dict[str, dict[str, Any]]:
    """The tuner's rows (``agentctl top``) by cell name."""
    return {r["name"]: r for r in call("top")["cells"]}


def knob(cell: str, name: str) -> int:
    """A cell's cgroup limit file in bytes or units; ``max`` as 2**62."""
    text = (CG / cell / name).read_text().split()[0]
    return 1 << 62 if text == "max" else int(text)


def mem_events(cell: str) -> dict[str, int]:
    lines = (CG / cell / "memory.events").read_text().splitlines()
    return {k: int(v) for k, v in (ln.split() for ln in lines)}


def logged(cell: str, text: str) -> bool:
    """The cell printed the line ``text`` (among its last 500)."""
    return text in logs(cell)


def http_get(address: str, port: int = 8080) -> str:
    with urllib.request.urlopen(f"http://{address}:{port}/", timeout=10) as r:
        return str(r.read().decode())


@pytest.fixture(name="cg")
def cgroup_v2_subtree() -> Iterator[CgroupV2]:
    """The fixture ``cg``: a cgroup v2 backend on a subtree of its own
    (``/sys/fs/cgroup/agt-<hex>``), set up; its cells are killed and it is removed after."""
    from agent.kernel.cgroupv2 import CgroupV2

    backend = CgroupV2(CGROOT / f"agt-{secrets.token_hex(3)}")
    backend.setup()
    yield backend
    for cell in backend.list_cells():
        backend.kill(cell)
        backend.remove(cell)
    backend.root.rmdir()


def journal_live() -> dict[str, list[str]]:
    """Cells, leases and unfinished plans the journal still holds."""
    from agent.core.cellrecord import replay
    from agent.core.plan import recover
    from agent.kernel.journal import read_journal

    if not JOURNAL.exists():
        return {"cells": [], "leases": [], "open_plans": []}
    recs = read_journal(JOURNAL).records
    st = replay(recs)
    return {"cells": sorted(st.cells), "leases": sorted(st.leases),
            "open_plans": sorted(p.target for p in recover(recs))}


def _mount_points() -> list[str]:
    # mount point and fs type of every mount of the root mount namespace (ids vary)
    out = []
    for line in Path("/proc/1/mountinfo").read_text().splitlines():
        f = line.split()
        out.append(f"{f[4]} {f[f.index('-') + 1]}")
    return sorted(out)


def leftovers() -> dict[str, Any]:
    """What cells may leave behind: everything here must be as before, VLAN gateways
    (agbr0.N and the bridge's own `vid N self`) included."""
    vlans = json.loads(sh("bridge", "-j", "vlan", "show", check=False).stdout or "[]")
    nft = sh("nft", "-j", "list", "ruleset", check=False)
    return {
        "cgroups": sorted(p.name for p in CG.iterdir() if p.is_dir()) if CG.exists() else [],
        "links": sorted(p.name for p in Path("/sys/class/net").iterdir()),
        "vlans": vlans,
        "mounts": _mount_points(),
        "netns": sorted(p.name for p in NETNS.iterdir()) if NETNS.exists() else [],
        "run": sorted(p.name for p in RUN_CELLS.iterdir()) if RUN_CELLS.exists() else [],
        "nft": json.loads(nft.stdout) if nft.returncode == 0 and nft.stdout else nft.stderr,
        "journal": journal_live(),
    }


def stop_all(parallel: int = 1) -> None:
    """Stop every cell; ``parallel`` stops at once (see docs/isolation.md: stopping the
    last cells of a VLAN concurrently leaks its gateway)."""
    names = list(ps())
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(lambda n: sh("agentctl", "stop", n, check=False, timeout=120), names))


def diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    return "\n".join(f"{k}: before {before.get(k)!r}\n{' ' * len(k)}  after  {after.get(k)!r}"
                     for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k))


def warm_up() -> None:
    """The first cell of a boot mounts /run/netns (bound onto itself and made shared, as
    `ip netns add` does), which stays: make it exist before a baseline is taken.  (A
    bind on the same file system: ``Path.is_mount`` does not see it.)"""
    if not any(line.split()[4] == str(NETNS)
               for line in Path("/proc/self/mountinfo").read_text().splitlines()):
        run_until_gone("demo-echo")


@pytest.fixture
def clean() -> Iterator[dict[str, Any]]:
    ensure_agentd()
    warm_up()
    before = leftovers()
    yield before
    ensure_agentd()
    stop_all()
    after = leftovers()
    assert after == before, "left behind:\n" + diff(before, after)


def manifest_text(name: str, args: list[str], *, command: str = "/bin/busybox",
                  image: str = DEMO, oneshot: bool = False, uid: int = 0,
                  resources: Mapping[str, Any] | None = None,
                  network: Mapping[str, Any] | None = None,
                  service: Mapping[str, Any] | None = None,
                  lifecycle: Mapping[str, Any] | None = None,
                  extra: str = "") -> str:
    """A manifest's TOML: ``service`` adds keys to [service] (``workdir``...),
    ``lifecycle`` to or over [lifecycle] (``destroy_on_exit``...); ``extra`` is
    appended (``[[writable]]`` tables...)."""
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)  # JSON strings and numbers are valid TOML

    lines = [f"name = {val(name)}", "[service]", f"command = {val(command)}",
             f"args = {val(args)}", f"uid = {uid}", f"gid = {uid}"]
    lines += [f"{k} = {val(v)}" for k, v in (service or {}).items()]
    lines += ["[image]", f"root = {val(image)}"]
    if resources:
        lines.append("[resources]")
        lines += [f"{k} = {val(v)}" for k, v in resources.items()]
    if network is not None:
        lines.append("[network]")
        lines += [f"{k} = {val(v)}" for k, v in network.items()]
    life = {"mode": "oneshot" if oneshot else "service", "restart": "no", **(lifecycle or {})}
    lines += ["[lifecycle]", *(f"{k} = {val(v)}" for k, v in life.items())]
    return "\n".join(lines) + "\n" + extra


def write_manifest(name: str, args: list[str], **kw: Any) -> Path:
    image = str(kw.get("image", DEMO))
    seal_image(image, again=("probes",) if image == str(PYIMG) else ())
    path = SERVICES / f"{name}.toml"
    path.write_text(manifest_text(name, args, **kw))
    return path


def py_image() -> str:
    """A cell image holding the box's python3: hard links of /usr, /lib and /bin (same
    file system, so instant), made once per boot.  Probes go to <image>/probes."""
    if (PYIMG / "usr/bin/python3").exists():
        return str(PYIMG)
    tmp = PYIMG.with_name("pyimage.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o755)
    tmp.parent.chmod(0o755)
    for d in ("usr", "lib", "bin"):
        sh("cp", "-al", f"/{d}", str(tmp / d))
    for d in ("proc", "dev", "tmp", "etc", "sys", "run", "probes", "data", "root"):
        (tmp / d).mkdir(exist_ok=True, mode=0o755)
    (tmp / "tmp").chmod(0o1777)
    (tmp / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (tmp / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tmp / "etc/group").write_text("root:x:0:\n")
    (tmp / "probes/probelib.py").write_text(PROBE_LIB)
    seal_image(str(tmp), f"{PYIMG}.seal")
    tmp.rename(PYIMG)
    return str(PYIMG)


WRITABLE = ("tmp", "data", "run")


def seal_image(image: str, seal: str | None = None, *, skip: tuple[str, ...] = WRITABLE,
               again: tuple[str, ...] = ()) -> str:
    """Seal a test image as a firmware build does (``agent-seal build``, docs/exec.md):
    channel 1 refuses to start a cell whose image has no seal, and runs only what it
    lists.  Sealed when there is no seal or a file changed since; ``again``: folders
    re-sealed every time, the rest kept (py_image's probes, written per test).  The seal
    file's path."""
    root, out = Path(image), Path(seal or image.rstrip("/") + ".seal")
    if out.exists() and again:
        old = Seal.parse(out.read_text(), str(out)).entries.values()
        entries = [e for e in old if not any(e.path == a or e.path.startswith(a + "/")
                                             for a in again)]
        for a in again:
            entries += [dataclasses.replace(e, path=f"{a}/{e.path}")
                        for e in seal_tree(root / a).entries.values()]
        new = Seal.of(entries)
    elif out.exists() and not _changed_since(root, out.stat().st_mtime, skip):
        return str(out)
    else:
        new = seal_tree(root, skip=skip)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(new.text())
    os.replace(tmp, out)
    return str(out)


def _changed_since(root: Path, when: float, skip: tuple[str, ...]) -> bool:
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
        for n in filenames:
            st = os.lstat(os.path.join(dirpath, n))
            if st.st_mtime >= when:
                return True
    return False


def run_until_gone(name: str, timeout: float = 60) -> list[str]:
    """Run a oneshot cell and wait until agentd destroyed it; its output lines."""
    ctl("run", name, timeout=timeout)
    try:
        wait_for(lambda: name not in ps(), f"{name} to be destroyed", timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- the cell still there ---\n{cell_state(name)}") from None
    return logs(name)


def cell_state(name: str) -> str:
    """What a cell that did not end is doing: its row, each of its processes' state,
    syscall and kernel stack, its output, and agentd's channel counters."""
    out: list[str] = []
    try:
        out.append(json.dumps(ps().get(name)))
        for procs in (CG / name).rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                for f in ("status", "syscall", "wchan", "stack"):
                    try:
                        text = (Path("/proc") / pid / f).read_text()
                    except OSError as exc:
                        text = str(exc)
                    if f == "status":
                        text = " ".join(x for x in text.splitlines()
                                        if x.split(":")[0] in ("Name", "State", "Seccomp"))
                    out.append(f"pid {pid} {f}: {text.strip()}")
        st = call("status")
        out.append(json.dumps({k: st.get(k) for k in ("syscall", "exec", "proc")}, default=str))
        out += logs(name)[-20:]
    except Exception as exc:  # a diagnosis must not hide the failure
        out.append(f"(diagnosis failed: {exc!r})")
    return "\n".join(out)


def probe(name: str, code: str, *, oneshot: bool = True, **kw: Any) -> dict[str, Any]:
    """Run ``code`` (python, after PROBE_LIB) as pid 1 of a fresh oneshot cell and return
    the dict it passed to ``result()``."""
    image = _probe_script(name, code)
    write_manifest(name, ["-S", "-B", f"/probes/{name}.py"], command="/usr/bin/python3",
                   image=image, oneshot=oneshot, **kw)
    try:
        lines = run_until_gone(name)
    finally:
        (SERVICES / f"{name}.toml").unlink(missing_ok=True)
    found = [x for x in lines if x.startswith("RESULT ")]
    assert found, f"probe {name} printed no RESULT:\n" + "\n".join(lines)
    return dict(json.loads(found[-1].removeprefix("RESULT ")))


def _probe_script(name: str, code: str) -> str:
    image = py_image()
    script = Path(image) / "probes" / f"{name}.py"
    script.write_text("import sys\nsys.path.insert(0, '/probes')\nfrom probelib import *\n"
                      + code)
    return image


def start(name: str, args: list[str], **kw: Any) -> dict[str, Any]:
    """Write a service manifest, run it; its ``ps`` row (the manifest stays until the
    test ends: the ``clean`` fixture stops the cell)."""
    write_manifest(name, args, **kw)
    ctl("run", name)
    row = ps()[name]
    assert row["state"] == "running", row
    return row


def start_probe(name: str, code: str, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run python ``code`` as pid 1 of a long-running cell; its ps row and the dict it
    passed to ``result()`` (the code should then sleep)."""
    image = _probe_script(name, code)
    row = start(name, ["-S", "-B", f"/probes/{name}.py"], command="/usr/bin/python3",
                image=image, **kw)

    def got() -> str | None:
        found = [x for x in logs(name) if x.startswith("RESULT ")]
        return found[-1] if found else None

    line = wait_for(got, f"{name} to print its RESULT", timeout=30)
    return row, dict(json.loads(line.removeprefix("RESULT ")))
