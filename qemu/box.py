"""Boot the emulated ARM set-top box and use it.

    qemu/box build                 build (or re-use) the image; print its parts
    qemu/box console               boot with a shell on the serial console
    qemu/box run [-t S] -- CMD...  boot, run CMD in the box, print its output,
                                   exit with its exit status
    qemu/box test [PYTEST ARGS]    run the guest test tier (tests/guest) in the box

The box is ``qemu-system-aarch64 -M virt -cpu cortex-a53`` with no network
device to the outside (``-nic none``).  The root disk is attached with
``snapshot=on``: every boot starts from the pristine image and several boots
may run at once.  In ``run``/``test`` mode two 9p shares are mounted in the
box: ``/mnt/host`` (a fresh host temp dir: the command, its exit status and
any result files) and ``/mnt/src`` (this repository, read-only).

``--state-disk FILE`` (``run``, ``console``) adds a second, persistent disk
(ext4, made by ``image.make_state_disk`` when FILE does not exist) that the
box mounts on agentd's state dir, ``/var/lib/agent``, before agentd starts:
the journal then outlives the boot.  :class:`Box` boots in the background, so
that a host-side test can cut the power (kill QEMU) at a moment it chooses
and boot again on the same state disk (tests/powercut).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import image

REPO = image.REPO
BEGIN = "@@BOX-BEGIN@@"
END = "@@BOX-END"


STATE_DEVICE = "/dev/vdb"  # the second virtio-blk device: the state disk


def qemu_argv(
    img: image.Image,
    mode: str,
    cpus: int,
    mem: int,
    hostio: Path | None,
    extra_append: str = "",
    state_disk: Path | None = None,
) -> list[str]:
    qemu = shutil.which("qemu-system-aarch64")
    if not qemu:
        raise SystemExit("box: qemu-system-aarch64 not found (apt-get install qemu-system-arm)")
    if state_disk is not None:
        extra_append += f" agent.statedisk={STATE_DEVICE}"
    append = f"console=ttyAMA0 quiet loglevel=3 panic=-1 agent.mode={mode} {extra_append}"
    argv = [
        qemu,
        "-M",
        "virt",
        "-cpu",
        "cortex-a53",
        "-smp",
        str(cpus),
        "-m",
        str(mem),
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(img.kernel),
        "-initrd",
        str(img.initrd),
        "-append",
        append.strip(),
        "-drive",
        f"file={img.rootdisk},if=none,id=root,format=raw,snapshot=on",
        "-device",
        "virtio-blk-pci,drive=root",
        "-device",
        "virtio-rng-pci",
    ]
    if state_disk is not None:
        # Persistent: no snapshot.  The guest sees a volatile write cache and flushes it
        # on fsync; killing QEMU loses exactly what the guest had not written out.
        argv += [
            "-drive",
            f"file={state_disk},if=none,id=state,format=raw,cache=writeback",
            "-device",
            "virtio-blk-pci,drive=state",
        ]
    if hostio is not None:
        argv += [
            "-virtfs",
            f"local,path={hostio},mount_tag=hostio,security_model=none,id=hostio",
            "-virtfs",
            f"local,path={REPO},mount_tag=src,security_model=none,readonly=on,id=src",
        ]
    return argv


def console(args: argparse.Namespace) -> int:
    img = image.build()
    disk = _state_disk(args)
    print(f"[box] booting ({img.kver}); leave with 'poweroff -f' or Ctrl-A X", file=sys.stderr)
    return subprocess.call(
        qemu_argv(img, "interactive", args.cpus, args.mem, None, state_disk=disk)
    )


def _state_disk(args: argparse.Namespace) -> Path | None:
    disk: Path | None = args.state_disk
    if disk is not None and not disk.exists():
        image.make_state_disk(disk)
    return disk


class Box:
    """One boot in ``run`` mode, in the background: ``script`` (sh) runs in the box; a
    thread reads the console (the script's output goes to ``out``).  :meth:`wait` for its
    exit status, or :meth:`power_cut` to kill QEMU at once, as a power cut would."""

    def __init__(
        self,
        script: str,
        *,
        hostio: Path,
        cpus: int = 2,
        mem: int = 1024,
        verbose: bool = False,
        out=None,  # type: ignore[no-untyped-def]
        state_disk: Path | None = None,
    ) -> None:
        self.out = out or sys.stdout
        self.verbose = verbose
        self.hostio = hostio
        img = image.build()
        (hostio / "cmd.sh").write_text(script)
        (hostio / "rc").unlink(missing_ok=True)
        argv = qemu_argv(img, "run", cpus, mem, hostio, state_disk=state_disk)
        self.t0 = time.monotonic()
        self.boot_s: float | None = None
        self.tail: list[str] = []
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, name="box-console", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        inside = False
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").replace("\r", "")
            self.tail = [*self.tail, line][-40:]
            # The sentinels may share a line with a kernel message printed meanwhile.
            if BEGIN in line:
                inside = True
                self.boot_s = time.monotonic() - self.t0
                continue
            if END in line:
                inside = False
                continue
            if inside or self.verbose:
                self.out.write(line)
                self.out.flush()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def wait(self, timeout: float) -> int | None:
        """The script's exit status, or None (timed out: killed; or the box stopped
        before the script ended)."""
        self._reader.join(max(0.0, timeout - self.elapsed))
        if self._reader.is_alive():
            self.power_cut()
        self.proc.wait()
        rcfile = self.hostio / "rc"
        if not rcfile.exists():
            return None
        return int(rcfile.read_text().strip() or "125")

    def power_cut(self) -> None:
        """SIGKILL QEMU: the guest's page cache and its disk's volatile cache are lost;
        what the guest had written out to its disks stays."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(30)


def prepare() -> None:
    """Build (or re-use) the image, so that boxes started together do not build it twice."""
    image.build()


def run_in_box(
    script: str,
    *,
    timeout: float,
    cpus: int,
    mem: int,
    verbose: bool,
    out=None,
    hostio: Path | None = None,
    state_disk: Path | None = None,
) -> int:  # type: ignore[no-untyped-def]
    """Boot, run ``script`` (sh) in the box, stream its output; return its exit status."""
    own = hostio is None
    hostio = hostio or Path(tempfile.mkdtemp(prefix="box-io-"))
    try:
        box = Box(script, hostio=hostio, cpus=cpus, mem=mem, verbose=verbose, out=out,
                  state_disk=state_disk)
        rc = box.wait(timeout)
        if rc is None:
            why = "timed out" if box.elapsed >= timeout else "the box stopped early"
            sys.stderr.write(
                f"[box] no exit status from the box ({why} after {box.elapsed:.0f} s);"
                " last console lines:\n" + "".join(box.tail)
            )
            return 125
        if box.boot_s is not None:
            sys.stderr.write(
                f"[box] boot {box.boot_s:.1f} s, total {box.elapsed:.1f} s, exit {rc}\n"
            )
        return rc
    finally:
        if own:
            shutil.rmtree(hostio, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise SystemExit("box run: give a command, e.g. qemu/box run -- agentctl status")
    script = ". /etc/profile\n" + (cmd[0] if len(cmd) == 1 else shlex.join(cmd)) + "\n"
    return run_in_box(
        script,
        timeout=args.timeout,
        cpus=args.cpus,
        mem=args.mem,
        verbose=args.verbose,
        state_disk=_state_disk(args),
    )


def guest_pytest_script(pytest_args: list[str], report: str | None) -> str:
    env = "AGENT_IN_GUEST=1"
    if report:
        env += f" AGENT_GUEST_REPORT={shlex.quote(report)}"
    return (
        ". /etc/profile\n"
        "cd /mnt/src\n"
        # -P: never import the work tree's agent/; the box tests the installed wheel.
        f"{env} exec python3 -P -m pytest -p no:cacheprovider --color=no "
        f"{shlex.join(pytest_args or ['tests/guest'])}\n"
    )


def test(args: argparse.Namespace) -> int:
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    return run_in_box(
        guest_pytest_script(pytest_args, None),
        timeout=args.timeout,
        cpus=args.cpus,
        mem=args.mem,
        verbose=args.verbose,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="qemu/box", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cpus", type=int, default=int(os.environ.get("AGENT_BOX_CPUS", "2")))
    p.add_argument(
        "--mem", type=int, default=int(os.environ.get("AGENT_BOX_MEM", "1024")), help="MiB"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show the whole console")
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("build", help="build or re-use the image")
    disk = argparse.ArgumentParser(add_help=False)
    disk.add_argument(
        "--state-disk",
        type=Path,
        metavar="FILE",
        help="a persistent ext4 disk mounted on /var/lib/agent (made if missing)",
    )
    sub.add_parser("console", parents=[disk], help="boot with a shell on the serial console")
    r = sub.add_parser("run", parents=[disk], help="run one command in the box")
    r.add_argument("-t", "--timeout", type=float, default=600)
    r.add_argument("command", nargs=argparse.REMAINDER)
    t = sub.add_parser("test", help="run pytest on tests/guest in the box")
    t.add_argument("-t", "--timeout", type=float, default=1500)
    t.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.what == "build":
        return image.main()
    return {"console": console, "run": run, "test": test}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
