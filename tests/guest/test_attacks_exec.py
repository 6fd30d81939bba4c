"""Channel 1 in the box (issue 11): executing what the cell's image did not seal, each
attack refused before it ran and reported on the bus with the right cell, pid and
channel, each beside its control (the same thing working where it is allowed).

One probe cell (python3 as pid 1, the py_image, a tmpfs ``/tmp`` that allows exec) tries
each in turn through subprocess and reports the errno; the test then reads the events.
The image's ``/probes`` is re-sealed when the manifest is written (cellkit): ``tool`` and
``listed`` are sealed copies of busybox (made unique by trailing bytes: ELF ignores
them), ``listed``'s hash goes into the signature database, and ``changed`` is written
to after sealing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from cellkit import (
    SERVICES,
    call,
    clean,
    logs,
    py_image,
    run_until_gone,
    wait_for,
    write_manifest,
)

__all__ = ["clean"]

TMPX = '[[writable]]\nkind = "tmpfs"\npath = "/tmp"\nsize = "8M"\nexec = true\n'
SIGNATURES = Path("/var/lib/agent/exec/signatures.txt")
ATTACKS = r'''
import shutil, subprocess
def run(argv, **kw):
    """The exit code, or the errno name the exec failed with."""
    try:
        return subprocess.run(argv, capture_output=True, timeout=120, **kw).returncode
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def fexecve(fd):
    pid = os.fork()
    if pid == 0:
        try:
            os.execve(fd, ["busybox", "true"], {})  # execveat(fd, "", AT_EMPTY_PATH)
        except OSError as e:
            os._exit(100 + e.errno)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
r = {"pid": os.getpid()}
r["sealed"] = run(["/bin/busybox", "true"])  # controls: sealed programs run
r["tool"] = run(["true"], executable="/probes/tool")  # busybox: the applet is argv[0]
shutil.copy("/bin/busybox", "/tmp/bb"); os.chmod("/tmp/bb", 0o755)
r["dropped"] = run(["/tmp/bb", "true"])
with open("/tmp/x.sh", "w") as f:
    f.write("#!/bin/busybox sh\necho script-ran\n")
os.chmod("/tmp/x.sh", 0o755)
r["script"] = run(["/tmp/x.sh"])
p = subprocess.run(["/bin/busybox", "sh", "/tmp/x.sh"], capture_output=True, text=True)
r["interpreted"] = p.stdout.strip()  # an interpreter reads a script: allowed (docs/exec.md)
fd = os.open("/tmp/bb", os.O_RDONLY)
r["fd_path"] = run([f"/proc/self/fd/{fd}", "true"], pass_fds=(fd,))
r["changed"] = run(["true"], executable="/probes/changed")
r["listed"] = run(["true"], executable="/probes/listed")
r["memfd"] = oserr(os.memfd_create, "x")
r["fexecve_sealed"] = fexecve(os.open("/bin/busybox", os.O_RDONLY))
r["again"] = run(["/bin/busybox", "true"])
result(r)
'''


def _events(cell: str, channel: str, kind: str) -> list[dict[str, Any]]:
    return list(call("events", n=200, cell=cell, channel=channel, kind=kind))


def _busybox_copy(dst: Path, tag: bytes) -> str:
    data = Path("/bin/busybox").read_bytes() + b"\0" + tag
    dst.write_bytes(data)
    dst.chmod(0o755)
    return hashlib.sha256(data).hexdigest()


def _signatures(text: str) -> None:
    SIGNATURES.parent.mkdir(parents=True, exist_ok=True)
    tmp = SIGNATURES.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, SIGNATURES)


def test_unsealed_changed_and_listed_execs_are_refused_and_reported(
        clean: dict[str, Any]) -> None:
    name = "ex-attack"
    image = Path(py_image())
    tag = secrets.token_hex(4).encode()
    _busybox_copy(image / "probes/tool", b"tool" + tag)
    listed = _busybox_copy(image / "probes/listed", b"listed" + tag)
    _busybox_copy(image / "probes/changed", b"changed" + tag)
    _signatures(f"# agent-signatures 1\n{listed} test-dropper\n")
    wait_for(lambda: any(e["attrs"].get("count", 0) >= 1 and
                         e["attrs"].get("path") == str(SIGNATURES)
                         for e in call("events", n=50, channel="exec",
                                       kind="signatures-loaded")),
             "the signature database to load", timeout=60)
    (image / "probes" / f"{name}.py").write_text(
        "import sys\nsys.path.insert(0, '/probes')\nfrom probelib import *\n" + ATTACKS)
    write_manifest(name, ["-S", "-B", f"/probes/{name}.py"], command="/usr/bin/python3",
                   image=str(image), oneshot=True, extra=TMPX)  # seals /probes
    with open(image / "probes/changed", "ab") as f:  # after sealing: an implant
        f.write(b"\0implant")
    try:
        lines = run_until_gone(name, timeout=180)
    finally:
        (SERVICES / f"{name}.toml").unlink(missing_ok=True)
        _signatures("# agent-signatures 1\n")
        for p in ("tool", "listed", "changed", f"{name}.py"):
            (image / "probes" / p).unlink(missing_ok=True)
    found = [x for x in lines if x.startswith("RESULT ")]
    assert found, "\n".join(lines)
    r = json.loads(found[-1].removeprefix("RESULT "))
    # controls
    assert (r["sealed"], r["tool"], r["again"]) == (0, 0, 0), r
    # attacks: refused before they ran (EPERM from execve)
    for k in ("dropped", "script", "fd_path", "changed"):
        assert r[k] == "EPERM", (k, r)
    assert r["listed"] in ("EPERM", -9), r  # the responder may kill the exec'ing child
    assert r["interpreted"] == "script-ran", r
    # memory-only execution: refused by the seccomp filter (memfd_create, fexecve)
    assert r["memfd"] == "EPERM", r
    assert r["fexecve_sealed"] == 100 + errno.EPERM, r
    denied = wait_for(lambda: len(_events(name, "exec", "exec-denied")) >= 5 and
                      _events(name, "exec", "exec-denied"), "the exec-denied events")
    got = {(e["attrs"]["path"], e["attrs"]["reason"]) for e in denied}
    assert got == {("/tmp/bb", "unsealed"), ("/tmp/x.sh", "unsealed"),
                   ("/probes/changed", "changed"), ("/probes/listed", "signature")}, got
    for e in denied:
        a = e["attrs"]
        assert e["cell"] == name and e["channel"] == "exec" and e["severity"] == "alert", e
        assert isinstance(a["pid"], int) and a["pid"] > 1 and a["hpid"] != a["pid"], a
        assert len(a["hash"]) == 64 and a["op"] == "exec", a
    assert next(e["attrs"]["signature"] for e in denied
            if e["attrs"]["reason"] == "signature") == "test-dropper"
    sc = {e["attrs"]["syscall"] for e in _events(name, "syscall", "denied")}
    assert {"memfd_create", "execveat"} <= sc, sc


def test_memory_execution_works_on_the_host_side(tmp_path: Path) -> None:
    """The controls of the memfd attacks: outside every cell, memfd_create and fexecve
    of a sealed program work (nothing but the cells' filter refuses them)."""
    fd = os.memfd_create("control")
    os.close(fd)
    src = os.open("/bin/busybox", os.O_RDONLY)
    pid = os.fork()
    if pid == 0:
        try:
            os.execve(src, ["busybox", "true"], {})
        finally:
            os._exit(99)
    os.close(src)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    # and a file outside every cell's mounts runs even if unsealed
    shutil.copy("/bin/busybox", tmp_path / "bb")
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(str(tmp_path / "bb"), ["true"])
        finally:
            os._exit(99)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_a_busy_benign_service_raises_no_alert(clean: dict[str, Any]) -> None:
    """A shell forking and exec'ing sealed programs in a loop (the long form is
    bench/execbench.py): every exec allowed, no exec event for the cell."""
    name = "ex-busy"
    loop = ("i=0; while [ $i -lt 300 ]; do /bin/busybox true; /bin/busybox echo $i "
            ">/dev/null; i=$((i+1)); done; echo busy-done")
    write_manifest(name, ["sh", "-c", loop], oneshot=True)
    try:
        lines = run_until_gone(name, timeout=300)
    finally:
        (SERVICES / f"{name}.toml").unlink(missing_ok=True)
    assert "busy-done" in lines, lines or logs(name)
    assert not _events(name, "exec", "exec-denied")
    assert not _events(name, "exec", "exec-unverified")
    st = call("status")["exec"]
    assert st["mode"] == "enforce" and st["errors"] == 0, st
