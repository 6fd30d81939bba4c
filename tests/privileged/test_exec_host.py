"""Channel 1 on the host kernel: fanotify permission events for real (root only).

A cell spawned by ``agent.kernel.spawn`` through :meth:`ExecService.spawn` (its mounts
marked at the CGROUP step, before pid 1 may exec), in a cgroup-v1 leaf of its own (the
attribution), with a sealed image holding a static busybox and a tmpfs ``/tmp`` that
allows exec.  Each attack runs beside its control in the same cell: the sealed program
runs, the dropped one is refused, and the refusal is an event naming the cell, the
path, the hash and the pid.  Needs root and busybox-static.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.core.cell import State
from agent.core.errors import AgentError
from agent.core.events import Event
from agent.core.manifest import Manifest, parse_manifest
from agent.core.sandbox import DEFAULT_MOUNTS, Mount, SpawnSpec, UidMap
from agent.daemon.bus import EventBus
from agent.kernel.cgroupdetect import detect
from agent.kernel.cgroupv1 import CONTROLLERS, CgroupV1
from agent.kernel.fanotify import Group
from agent.kernel.seal import seal_tree
from agent.monitor.exec.service import ExecService
from agent.monitor.exec.settings import ExecSettings

BUSYBOX = shutil.which("busybox")
CELL = "exec-t1"


@pytest.fixture(autouse=True)
def _busybox() -> None:
    if BUSYBOX is None:
        pytest.fail("busybox is not installed: ./dev test installs it (busybox-static)")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def image() -> Iterator[Path]:
    """A sealed image: busybox, ``true`` (a sealed copy), ``false`` (sealed, and in the
    signature database), ``cat`` (sealed, then changed on the host)."""
    base = Path(tempfile.mkdtemp(prefix="agent-exec-"))
    base.chmod(0o755)
    root = base / "img"
    for d in ("bin", "proc", "dev", "tmp", "etc"):
        (root / d).mkdir(parents=True)
    assert BUSYBOX is not None
    for name in ("busybox", "true", "false", "cat"):  # copies, named for their applet
        shutil.copy(BUSYBOX, root / "bin" / name)
    (root / "bin/false").write_bytes((root / "bin/false").read_bytes() + b"\0bad")
    (root / "bin/sh").symlink_to("busybox")
    (root / "bin/hello.sh").write_text("#!/bin/sh\necho sealed-script-ran\n")
    (root / "bin/hello.sh").chmod(0o755)
    (base / "img.seal").write_text(seal_tree(root, skip=("tmp",)).text())
    with open(root / "bin/cat", "ab") as f:  # after sealing: what an attacker did
        f.write(b"\0implant")
    yield root
    shutil.rmtree(base)


@pytest.fixture
def cgroup() -> Iterator[CgroupV1]:
    layout = detect()
    if layout.kind != "v1" or "memory" not in layout.hierarchies:
        pytest.skip(f"host has no cgroup-v1 memory hierarchy ({layout.reason})")
    hier = {c: p for c, p in layout.hierarchies.items() if c in CONTROLLERS}
    cg = CgroupV1(Path("/sys/fs/cgroup"), f"agent-exec-{secrets.token_hex(3)}",
                  hierarchies=hier)
    cg.setup()
    cg.create(CELL)
    yield cg
    for cell in cg.list_cells():
        cg.kill(cell)
        cg.remove(cell)
    for mount in set(hier.values()):
        with_name = mount / cg.name
        if with_name.exists():
            os.rmdir(with_name)


@dataclass
class _Entry:
    manifest: Manifest
    pid: int | None = None
    state: State = State.CREATING


class _Dir:
    def __init__(self) -> None:
        self.cells: dict[str, _Entry] = {}


def manifest(image: Path, **image_keys: str) -> Manifest:
    extra = "".join(f'{k} = "{v}"\n' for k, v in image_keys.items())
    return parse_manifest(f'name = "{CELL}"\n[service]\ncommand = "/bin/busybox"\n'
                          f'[image]\nroot = "{image}"\n{extra}')


HOLD = "\nmkfifo /tmp/hold; read -r _ < /tmp/hold\n"


def release(svc: ExecService, fifo: str) -> None:
    """Wait (worker thread) for the cell to block on its ``hold`` fifo (every exec it
    made is then queued), let the service answer all, then let the cell end.  Report
    mode needs it: a notification read after the cell is gone names a file on a mount
    that is gone, with its path on that mount only."""
    while not os.path.exists(fifo):
        time.sleep(0.02)
    with open(fifo, "w") as f:  # returns once the cell opened it to read
        assert svc.loop is not None
        assert asyncio.run_coroutine_threadsafe(svc.settle(), svc.loop).result()
        f.write("go\n")


async def run_cell(svc: ExecService, image: Path, cg: CgroupV1, script: str,
                   directory: _Dir, hold: bool = False,
                   extra: tuple[Mount, ...] = ()) -> tuple[int, str]:
    """Spawn ``sh -c script`` in the cell and wait for it; (exit code, output)."""
    script += HOLD if hold else ""
    r, w = os.pipe()
    spec = SpawnSpec(argv=("/bin/sh", "-c", script), rootfs=str(image),
                     env=(("PATH", "/bin"),), hostname=CELL, stdout=w, stderr=w,
                     cgroup_path=str(cg.leaf(CELL)), userns=UidMap(300000, 65536),
                     mounts=(*DEFAULT_MOUNTS, Mount("tmpfs", "/tmp", size=8 << 20,
                                                    flags=frozenset({"nosuid", "nodev"})),
                             *extra))
    try:
        cell = await asyncio.to_thread(svc.spawn, spec)
    finally:
        os.close(w)
    directory.cells[CELL].pid = cell.pid
    if hold:  # the cell ends with ``hold``: it waits, mounts intact, until we settled
        await asyncio.to_thread(release, svc, f"/proc/{cell.pid}/root/tmp/hold")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    loop.add_reader(cell.pidfd, lambda: done.done() or done.set_result(None))
    try:
        await asyncio.wait_for(done, 60)
    finally:
        loop.remove_reader(cell.pidfd)
    _, status = os.waitpid(cell.pid, 0)
    os.close(cell.pidfd)
    with os.fdopen(r, "rb") as f:
        return os.waitstatus_to_exitcode(status), f.read().decode()


def scenario(image: Path, cg: CgroupV1, script: str, tmp: Path, *, signatures: str = "",
             hold: bool = False, **settings: Any
             ) -> tuple[int, str, list[Event], dict[str, Any]]:
    sigfile = tmp / "signatures.txt"
    sigfile.write_text("# agent-signatures 1\n" + signatures)
    bus = EventBus()
    svc = ExecService(bus, ExecSettings(signatures=sigfile, **settings))
    directory = _Dir()
    directory.cells[CELL] = _Entry(manifest(image))

    async def go() -> tuple[int, str]:
        svc.attach(directory, cg)
        await svc.start()
        try:
            return await run_cell(svc, image, cg, script, directory, hold)
        finally:
            svc.close()

    code, out = asyncio.run(go())
    return code, out, bus.recent(channel="exec"), svc.status()


def denied(events: list[Event]) -> dict[str, Mapping[str, Any]]:
    return {str(e.attrs["path"]): e.attrs for e in events if e.kind == "exec-denied"}


ATTACKS = r"""
/bin/busybox true; echo sealed=$?
/bin/true; echo tool=$?
/bin/hello.sh; echo sealed_script=$?
cp /bin/busybox /tmp/true; chmod 755 /tmp/true
/tmp/true; echo dropped=$?
printf '#!/bin/sh\necho dropped-script-ran\n' > /tmp/x.sh; chmod 755 /tmp/x.sh
/tmp/x.sh; echo dropped_script=$?
sh /tmp/x.sh; echo interpreted=$?
exec 3< /tmp/true
/proc/self/fd/3 true; echo fd_exec=$?
/bin/cat /dev/null; echo changed=$?
/bin/false; echo bad=$?
/bin/busybox true; echo again=$?
"""


def test_dropped_changed_and_listed_files_are_denied_beside_their_controls(
        image: Path, cgroup: CgroupV1, tmp_path: Path) -> None:
    bad = sha(image / "bin/false")
    code, out, events, status = scenario(image, cgroup, ATTACKS, tmp_path,
                                         signatures=f"{bad} test-malware\n")
    lines = dict(x.split("=", 1) for x in out.splitlines() if "=" in x)
    assert code == 0, out
    # controls: sealed programs and a sealed script run, the same busybox again (cached)
    assert (lines["sealed"], lines["tool"], lines["sealed_script"], lines["again"]) == \
        ("0", "0", "0", "0"), out
    assert "sealed-script-ran" in out
    # attacks: each refused before it ran (126: the shell's "cannot execute")
    for key in ("dropped", "dropped_script", "fd_exec", "changed", "bad"):
        assert lines[key] == "126", (key, out)
    assert "dropped-script-ran" in out  # `sh x.sh` reads the script: allowed (docs/exec.md)
    got = denied(events)
    assert set(got) == {"/tmp/true", "/tmp/x.sh", "/bin/cat", "/bin/false"}, events
    assert got["/tmp/true"]["reason"] == "unsealed"
    assert got["/tmp/x.sh"]["reason"] == "unsealed"
    assert got["/bin/cat"]["reason"] == "changed"
    assert got["/bin/false"]["reason"] == "signature"
    assert got["/bin/false"]["signature"] == "test-malware"
    assert got["/tmp/true"]["hash"] == sha(image / "bin/busybox")
    assert got["/bin/cat"]["hash"] == sha(image / "bin/cat")
    for e in events:
        if e.kind == "exec-denied":
            assert e.cell == CELL and e.severity == "alert"
            assert isinstance(e.attrs["pid"], int) and e.attrs["pid"] > 1
            assert e.attrs["hpid"] != e.attrs["pid"] and e.attrs["op"] == "exec"
    # /tmp/true and /proc/self/fd/3 are the same file: two refusals of one path
    assert sum(1 for e in events if e.attrs.get("path") == "/tmp/true") == 2
    # the same busybox again: answered by the kernel (an ignored mask) or the cache
    assert status["ignored"] >= 1 and status["errors"] == 0


def test_report_mode_lets_them_run_and_reports_each(image: Path, cgroup: CgroupV1,
                                                    tmp_path: Path) -> None:
    code, out, events, _ = scenario(image, cgroup, ATTACKS, tmp_path, mode="report",
                                      hold=True)
    lines = dict(x.split("=", 1) for x in out.splitlines() if "=" in x)
    assert code == 0 and lines["dropped"] == lines["changed"] == "0", out
    assert lines["fd_exec"] == "127", out  # busybox ran, and knows no applet named "3"
    got = {e.attrs["path"]: e.attrs["reason"] for e in events if e.kind == "exec-unverified"}
    assert got == {"/tmp/true": "unsealed", "/tmp/x.sh": "unsealed", "/bin/cat": "changed"}
    assert not [e for e in events if e.kind == "exec-denied"]


def test_an_unsealed_image_does_not_start_unless_allowed(image: Path, cgroup: CgroupV1,
                                                         tmp_path: Path) -> None:
    (image.parent / "img.seal").unlink()
    with pytest.raises(AgentError) as exc:
        scenario(image, cgroup, "echo ran", tmp_path)
    assert exc.value.code == "E_EXEC_UNSEALED" and "agent-seal build" in (exc.value.hint or "")
    assert cgroup.procs(CELL) == []  # nothing of the cell runs
    # development: allowed, and checked against the signature database only
    bad = sha(image / "bin/false")
    _, out, events, _ = scenario(image, cgroup, ATTACKS, tmp_path, allow_unsealed=True,
                                 signatures=f"{bad} test-malware\n")
    lines = dict(x.split("=", 1) for x in out.splitlines() if "=" in x)
    assert lines["dropped"] == lines["changed"] == "0" and lines["bad"] == "126", out
    assert set(denied(events)) == {"/bin/false"}
    assert [e.kind for e in events if e.kind == "unsealed-image"] == ["unsealed-image"]


def test_the_manifest_names_the_seal(image: Path, cgroup: CgroupV1, tmp_path: Path) -> None:
    elsewhere = tmp_path / "other.seal"
    (image.parent / "img.seal").rename(elsewhere)
    bus, directory = EventBus(), _Dir()
    svc = ExecService(bus, ExecSettings(signatures=tmp_path / "none.txt"))
    directory.cells[CELL] = _Entry(manifest(image, seal=str(elsewhere)))

    async def go() -> tuple[int, str]:
        svc.attach(directory, cgroup)
        try:
            return await run_cell(svc, image, cgroup, "/tmp/../bin/true; echo ok=$?",
                                  directory)
        finally:
            svc.close()

    code, out = asyncio.run(go())
    assert (code, out.strip()) == (0, "ok=0")


def test_a_host_process_through_the_cells_mount_is_allowed(image: Path, cgroup: CgroupV1,
                                                          tmp_path: Path) -> None:
    """An operator on the host (no cell's cgroup) runs the cell's dropped file through
    /proc/PID/root: allowed and counted, not reported; the cell's own exec is denied."""
    script = ("cp /bin/busybox /tmp/true; chmod 755 /tmp/true; mkfifo /tmp/go; "
              "read -r _ < /tmp/go; /tmp/true; echo cell=$?")
    bus, directory = EventBus(), _Dir()
    svc = ExecService(bus, ExecSettings(signatures=tmp_path / "none.txt"))
    directory.cells[CELL] = _Entry(manifest(image))
    result: dict[str, Any] = {}

    async def host_exec() -> None:
        for _ in range(100):
            pid = directory.cells[CELL].pid
            if pid and os.path.exists(f"/proc/{pid}/root/tmp/go"):
                break
            await asyncio.sleep(0.05)
        # a host shell exec's the cell's file.  Never exec a marked file straight from
        # the loop's own interpreter: subprocess uses vfork and holds the GIL until the
        # child's exec, which waits for the loop's answer (docs/exec.md, "agentd itself");
        # /bin/sh is not on a marked mount
        done = await asyncio.to_thread(subprocess.run, [
            "/bin/sh", "-c", f'exec "/proc/{pid}/root/tmp/true"'], timeout=30)
        result["host"] = done.returncode
        # a fifo the cell made: host root cannot create a file on a tmpfs mounted in
        # the cell's user namespace (its uid is not mapped there)
        await asyncio.to_thread(Path(f"/proc/{pid}/root/tmp/go").write_text, "go\n")

    async def go() -> tuple[int, str]:
        svc.attach(directory, cgroup)
        try:
            task = asyncio.create_task(host_exec())
            out = await run_cell(svc, image, cgroup, script, directory)
            await task
            return out
        finally:
            svc.close()

    _, out = asyncio.run(go())
    assert result["host"] == 0 and "cell=126" in out, out
    assert svc.counts["host"] >= 1
    assert set(denied(bus.recent(channel="exec"))) == {"/tmp/true"}


def test_a_group_keeps_its_marks_when_handed_on(tmp_path: Path) -> None:
    """What a respawn relies on: the marks belong to the group, not to the fd number:
    a duplicate (what exec passes on) still gets the events after the first is closed."""
    g = Group.open(True)
    d = tmp_path / "d"
    d.mkdir()
    os.system(f"mount -t tmpfs tmpfs {d}")  # a mount of our own to mark
    try:
        shutil.copy("/bin/true", d / "t")
        g.mark_mount(str(d))
        heir = Group.adopt(os.dup(g.fileno()), True)
        g.close()
        pid = os.fork()
        if pid == 0:
            try:
                os.execv(str(d / "t"), ["t"])
            except OSError as e:
                os._exit(100 + (e.errno or 0))
        seen = []
        for _ in range(200):
            for ev in heir.read():
                seen.append(os.readlink(f"/proc/self/fd/{ev.fd}"))
                heir.respond(ev.fd, False)
                os.close(ev.fd)
            if seen:
                break
            asyncio.run(asyncio.sleep(0.02))
        _, status = os.waitpid(pid, 0)
        heir.close()
        assert seen == [str(d / "t")]
        assert os.waitstatus_to_exitcode(status) == 100 + errno.EPERM
    finally:
        os.system(f"umount {d}")


class _Broken(ExecService):
    """A check that fails inside (a bug, a /proc read error): fail closed."""

    def _attribute(self, w: Any, ev: Any) -> str | None:
        raise RuntimeError("attribution broke")


def test_a_failing_check_denies_the_exec_and_says_why(image: Path, cgroup: CgroupV1,
                                                      tmp_path: Path) -> None:
    """Even the service's first exec: the cell does not start, the refusal is an alert
    with reason ``error``, and nothing is left waiting in the kernel."""
    bus, directory = EventBus(), _Dir()
    svc = _Broken(bus, ExecSettings(signatures=tmp_path / "none.txt"))
    directory.cells[CELL] = _Entry(manifest(image))

    async def go() -> None:
        svc.attach(directory, cgroup)
        try:
            with pytest.raises(AgentError) as exc:
                await run_cell(svc, image, cgroup, "echo ran", directory)
            assert "execve" in str(exc.value) and "EPERM" in str(exc.value), exc.value
            assert svc.status()["waiting"] == 0
        finally:
            svc.close()

    asyncio.run(go())
    errors = [e for e in bus.recent(channel="exec") if e.kind == "exec-denied"]
    assert errors and all(e.attrs["reason"] == "error" and e.severity == "alert"
                          and "attribution broke" in e.attrs["error"] for e in errors)
    assert errors[0].attrs["path"] == "/bin/busybox"  # /bin/sh -> busybox, the first exec
    assert cgroup.procs(CELL) == []


def test_a_respawned_master_takes_the_groups_over(image: Path, cgroup: CgroupV1,
                                                  tmp_path: Path) -> None:
    """The respawn path: the old service's groups (``kept``) are inherited by a new one,
    which claims them for the live cell at its start; the cell's later execs are judged
    by the new service.  The old one is closed in between: the marks stayed with the
    group (its duplicate), so nothing ran unchecked."""
    script = ("cp /bin/busybox /tmp/true; chmod 755 /tmp/true; mkfifo /tmp/go; "
              "read -r _ < /tmp/go; /tmp/true; echo dropped=$?; /bin/true; echo sealed=$?")
    bus, directory = EventBus(), _Dir()
    old = ExecService(bus, ExecSettings(signatures=tmp_path / "none.txt"))
    directory.cells[CELL] = _Entry(manifest(image))
    heirs: list[ExecService] = []

    async def respawn() -> None:
        for _ in range(200):
            pid = directory.cells[CELL].pid
            if pid and os.path.exists(f"/proc/{pid}/root/tmp/go"):
                break
            await asyncio.sleep(0.05)
        kept = {name: os.dup(fd) for name, fd in old.kept().items()}
        assert list(kept) == [f"fanotify:exec:perm:{CELL}"]
        old.flush()
        old.close()
        new = ExecService(bus, ExecSettings(signatures=tmp_path / "none.txt"),
                          inherited=kept)
        heirs.append(new)
        new.attach(directory, cgroup)
        await new.start()
        assert new.status()["cells"] == 1
        await asyncio.to_thread(Path(f"/proc/{pid}/root/tmp/go").write_text, "go\n")

    async def go() -> tuple[int, str]:
        old.attach(directory, cgroup)
        task = asyncio.create_task(respawn())
        try:
            out = await run_cell(old, image, cgroup, script, directory)
            await task
            return out
        finally:
            for s in heirs:
                s.close()

    code, out = asyncio.run(go())
    assert code == 0 and "dropped=126" in out and "sealed=0" in out, out
    assert heirs and heirs[0].counts["denied"] == 1 and heirs[0].counts["allowed"] >= 1
    assert set(denied(bus.recent(channel="exec"))) == {"/tmp/true"}


def test_a_file_the_kernel_stopped_asking_about_is_asked_again_when_it_changes(
        image: Path, cgroup: CgroupV1, tmp_path: Path) -> None:
    """The fast path's safety: an allowed image file is ignored by the kernel until it is
    written to (here from the host, through another mount), and every ignored file is
    asked about again when the signature database changes."""
    script = ("/bin/true; echo a=$?; mkfifo /tmp/w1 /tmp/w2; read -r _ < /tmp/w1; "
              "/bin/true; echo b=$?; read -r _ < /tmp/w2; /bin/busybox true; echo c=$?")
    sigfile = tmp_path / "signatures.txt"
    sigfile.write_text("# agent-signatures 1\n")
    bus, directory = EventBus(), _Dir()
    svc = ExecService(bus, ExecSettings(signatures=sigfile))
    directory.cells[CELL] = _Entry(manifest(image))

    async def meddle() -> None:
        for _ in range(200):
            pid = directory.cells[CELL].pid
            if pid and os.path.exists(f"/proc/{pid}/root/tmp/w2"):
                break
            await asyncio.sleep(0.05)
        assert svc.counts["ignored"] >= 1  # /bin/true and busybox ran, now ignored
        with open(image / "bin/true", "ab") as f:  # the host changes a sealed file
            f.write(b"\0changed-while-ignored")
        await asyncio.to_thread(Path(f"/proc/{pid}/root/tmp/w1").write_text, "go\n")
        bad = sha(image / "bin/busybox")
        loads = svc.signatures.loads
        sigfile.write_text(f"# agent-signatures 1\n{bad} now-listed\n")
        for _ in range(200):
            if svc.signatures.loads > loads:
                break
            await asyncio.sleep(0.05)
        await asyncio.to_thread(Path(f"/proc/{pid}/root/tmp/w2").write_text, "go\n")

    async def go() -> tuple[int, str]:
        svc.attach(directory, cgroup)
        await svc.start()
        try:
            task = asyncio.create_task(meddle())
            out = await run_cell(svc, image, cgroup, script, directory)
            await task
            return out
        finally:
            svc.close()

    _, out = asyncio.run(go())
    assert "a=0" in out and "b=126" in out and "c=126" in out, out
    got = {p: a["reason"] for p, a in denied(bus.recent(channel="exec")).items()}
    assert got == {"/bin/true": "changed", "/bin/busybox": "signature"}, got


WRITER = r"""
printf 'payload-1' > /data/tool; echo wrote=$?
printf 'scratch' > /tmp/scratch; echo tmp=$?
cat /data/tool > /dev/null; echo read=$?
mkdir /data/sub && printf 'payload-2' > /data/sub/more; echo deeper=$?
"""


@pytest.mark.parametrize("mode", ["enforce", "report"])
def test_files_written_in_the_data_dir_are_reported_with_their_hash(
        image: Path, cgroup: CgroupV1, tmp_path: Path, mode: str) -> None:
    """exec/file-written: a file closed after writing in the cell's data dir (mounted
    noexec, as the agent mounts it) is reported with its SHA-256, size and ``source``;
    the controls: a write to /tmp and a read of the data dir are not."""
    data = image.parent / "data"  # (reachable by the cell's mapped uid, as tmp_path is not)
    data.mkdir()
    os.chown(data, 300000, 300000)
    (image / "data").mkdir()
    sigfile = tmp_path / "signatures.txt"
    sigfile.write_text("# agent-signatures 1\n")
    bus = EventBus()
    svc = ExecService(bus, ExecSettings(signatures=sigfile, mode=mode))  # type: ignore[arg-type]
    directory = _Dir()
    directory.cells[CELL] = _Entry(parse_manifest(
        f'name = "{CELL}"\n[service]\ncommand = "/bin/busybox"\n[image]\nroot = "{image}"\n'
        '[[writable]]\nkind = "data"\npath = "/data"\n'))
    bind = Mount("bind", "/data", source=str(data),
                 flags=frozenset({"nosuid", "nodev", "noexec"}))

    def written() -> list[Event]:
        return [e for e in bus.recent(channel="exec") if e.kind == "file-written"]

    async def go() -> tuple[int, str]:
        svc.attach(directory, cgroup)
        await svc.start()
        try:
            got = await run_cell(svc, image, cgroup, WRITER, directory, hold=True,
                                 extra=(bind,))
            for _ in range(500):  # (hashed in the worker)
                if len(written()) >= 2:
                    break
                await asyncio.sleep(0.01)
            return got
        finally:
            svc.close()

    code, out = asyncio.run(go())
    assert code == 0 and "wrote=0" in out and "deeper=0" in out and "read=0" in out, out
    got = {str(e.attrs["path"]): e for e in written()}
    assert sorted(got) == ["/data/sub/more", "/data/tool"], got
    tool = got["/data/tool"]
    assert tool.cell == CELL and tool.severity == "info"
    assert tool.attrs["hash"] == hashlib.sha256(b"payload-1").hexdigest()
    assert tool.attrs["size"] == 9 and tool.attrs["source"] == CELL
    assert isinstance(tool.attrs["hpid"], int) and tool.attrs["hpid"] > 0
    assert got["/data/sub/more"].attrs["hash"] == hashlib.sha256(b"payload-2").hexdigest()
    assert not [e for e in bus.recent(channel="exec") if e.kind in ("exec-denied",
                                                                   "exec-unverified")]


def test_a_write_just_before_the_cell_ends_is_still_reported(
        image: Path, cgroup: CgroupV1, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A oneshot that drops a file and exits: its cell's group is closed when the cell is
    destroyed, perhaps before the loop read the notification.  Here the loop never reads
    the group (report mode: no exec waits for an answer), so only the drain at close
    can report the write; the control: the same run reports nothing without it."""
    data = image.parent / "data"
    data.mkdir()
    os.chown(data, 300000, 300000)
    (image / "data").mkdir()
    sigfile = tmp_path / "signatures.txt"
    sigfile.write_text("# agent-signatures 1\n")
    bind = Mount("bind", "/data", source=str(data),
                 flags=frozenset({"nosuid", "nodev", "noexec"}))

    def run(drain: bool) -> list[Event]:
        bus = EventBus()
        svc = ExecService(bus, ExecSettings(signatures=sigfile, mode="report"))
        monkeypatch.setattr(svc, "_register", lambda w: None)  # the loop never reads it
        if not drain:
            monkeypatch.setattr(svc, "_last_writes", lambda w: None)
        directory = _Dir()
        directory.cells[CELL] = _Entry(parse_manifest(
            f'name = "{CELL}"\n[service]\ncommand = "/bin/busybox"\n[image]\n'
            f'root = "{image}"\n[[writable]]\nkind = "data"\npath = "/data"\n'))

        async def go() -> None:
            svc.attach(directory, cgroup)
            await svc.start()
            try:
                code, out = await run_cell(svc, image, cgroup, "printf dropped > /data/t",
                                           directory, extra=(bind,))
                assert code == 0, out
                svc._drop(CELL)  # the cell was destroyed
                for _ in range(300):  # (hashed in the worker)
                    if [e for e in bus.recent(channel="exec") if e.kind == "file-written"]:
                        break
                    await asyncio.sleep(0.01)
            finally:
                svc.close()

        asyncio.run(go())
        return [e for e in bus.recent(channel="exec") if e.kind == "file-written"]

    assert run(drain=False) == []  # the control: lost without the drain
    got = run(drain=True)
    assert [(e.attrs["path"], e.attrs["hash"], e.attrs["source"], e.cell) for e in got] == [
        ("/data/t", hashlib.sha256(b"dropped").hexdigest(), CELL, CELL)]
