"""``agentctl diag``: one screen for a serial console, and a diagnostic bundle.

``agentctl diag`` prints at most 24 lines of at most 80 columns: agent version,
agentd pid and uptime (or that agentd is down, and why), kernel, checkconfig
summary, cgroup mode, cells by state, budget, journal size, disk and memory
free, and the last alerts and errors.  Everything that can be read without the
daemon is still shown when the daemon is down.

``agentctl diag --bundle [FILE]`` writes a tar.gz for a bug report (default
``/tmp/agent-diag-<host>-<timestamp>.tar.gz``).  Each section is a guarded
collector: a failing one writes its error to ``errors.txt`` and the bundle is
still made; a progress line per section goes to stderr.  Private keys
(``*.key``) are never copied; the bundle's ``index.txt`` notes each one skipped.

Every path is taken under :attr:`Sources.root` and the daemon is reached
through :attr:`Sources.client`, so tests use a fake tree and a fake client.
Exit status: 0 screen or bundle made; 1 the bundle could not be written; 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol, TextIO

from agent import __version__
from agent.cli.client import DEFAULT_SOCKET, Client, ConnectError, TransportError
from agent.core.args import parse
from agent.core.config import AgentConfig
from agent.core.config import load_config as load_agent_config
from agent.core.errors import AgentError
from agent.core.features import to_json
from agent.core.kconfig import Status, fragment_symbols
from agent.kernel.cgroupdetect import detect
from agent.kernel.probes import check, load_config

__all__ = [
    "HEIGHT",
    "WIDTH",
    "Bundle",
    "DaemonClient",
    "DaemonView",
    "Sources",
    "cli_main",
    "default_bundle_path",
    "query_daemon",
    "screen",
    "write_bundle",
]

WIDTH, HEIGHT = 80, 24
LOG_PATH = "/var/log/agentd.log"
PIDFILE = "/var/run/agentd.pid"
_CGROUP_KEYS = ("cgroup.controllers", "cgroup.subtree_control", "cgroup.events", "cgroup.procs",
                "cpu.max", "cpu.weight", "cpu.stat", "io.weight")
_CGROUP_PREFIXES = ("memory.", "pids.")
_MAX_FILE = 256 << 10


class DaemonClient(Protocol):
    """What diag needs of :class:`agent.client.Client`."""

    def call(self, op: str, /, **args: Any) -> Any: ...

    def close(self) -> None: ...


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)


@dataclass
class Sources:
    """Where diag looks: filesystem root, control socket, command runner, clock."""

    root: Path = Path("/")
    socket: Path = DEFAULT_SOCKET
    client: Callable[[], DaemonClient] | None = None
    run: Runner = _run
    which: Callable[[str], str | None] = shutil.which
    uname: Callable[[], os.uname_result] = os.uname
    clock: Callable[[], float] = time.time
    timeout: float = 5.0
    _config: AgentConfig | None = field(default=None, repr=False)

    def p(self, path: str | Path) -> Path:
        return self.root / str(path).lstrip("/")

    def connect(self) -> DaemonClient:
        if self.client is not None:
            return self.client()
        return Client(self.socket, timeout=self.timeout)

    def config(self) -> AgentConfig:
        """agentd.toml under the root (the defaults if it is missing)."""
        if self._config is None:
            self._config = load_agent_config(self.p("/etc/agent/agentd.toml"), missing_ok=True)
        return self._config


# ------------------------------------------------------------------------------ daemon

@dataclass
class DaemonView:
    """What agentd answered.  ``down`` is set when it could not be reached at all."""

    down: str | None = None
    status: dict[str, Any] | None = None
    ps: list[dict[str, Any]] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _message(exc: BaseException) -> str:
    if isinstance(exc, AgentError):
        return f"{exc.message} [{exc.code}]"
    return str(exc)


def query_daemon(src: Sources, n_events: int = 8) -> DaemonView:
    view = DaemonView()
    try:
        client = src.connect()
    except (AgentError, OSError) as exc:
        view.down = _message(exc)
        return view
    try:
        view.status = client.call("status")
    except (ConnectError, TransportError, OSError) as exc:
        view.down = _message(exc)
        client.close()
        return view
    except AgentError as exc:
        view.problems.append(f"status: {exc}")
    try:
        view.ps = client.call("ps")
    except AgentError as exc:
        view.problems.append(f"ps: {exc}")
    try:
        view.events = client.call("events", n=n_events, severity="notice")
    except AgentError as exc:
        view.problems.append(f"events: {exc}")
    client.close()
    return view


# ------------------------------------------------------------------------------ screen

def _clip(line: str) -> str:
    return line if len(line) <= WIDTH else line[: WIDTH - 3] + "..."


def _size(n: float) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}{unit}"
    return f"{int(n)}B"


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _pidfile_note(src: Sources) -> str:
    try:
        pid = src.p(PIDFILE).read_text().strip()
    except OSError:
        return f"no pid file {PIDFILE}"
    alive = pid.isdigit() and src.p(f"/proc/{pid}").is_dir()
    return f"pid file names {pid} ({'alive' if alive else 'not running'})"


def _daemon_lines(src: Sources, view: DaemonView) -> list[str]:
    if view.down is not None:
        return [f"agentd   DOWN: {view.down}",
                f"         {_pidfile_note(src)}; log {LOG_PATH}",
                "         start it: /etc/init.d/S50agentd start"]
    st = view.status or {}
    return [f"agentd   {st.get('version', '?')} pid {st.get('pid', '?')} up "
            f"{_duration(float(st.get('uptime_s', 0)))}, {st.get('events', '?')} events, "
            f"socket {src.socket}"]


def _kernel_lines(src: Sources, view: DaemonView) -> list[str]:
    uts = src.uname()
    try:
        mode: str = detect(src.p("/proc"), src.root).kind
    except AgentError:
        mode = "unknown"
    report = check(src.root, release=uts.release)
    counts = {s: sum(1 for f in report.features if f.status is s) for s in Status}
    absent = [f.feature.name for f in report.features if f.status is Status.MISSING]
    source = report.config_source or "not found"
    if source.startswith(str(src.root).rstrip("/") + "/"):  # as seen on the box
        source = "/" + str(Path(source).relative_to(src.root))
    out = [f"kernel   {uts.release} {uts.machine}, cgroup {mode}, config {source}",
           f"features {counts[Status.PRESENT]} present, {counts[Status.DEGRADED]} degraded, "
           f"{counts[Status.MISSING]} missing, {counts[Status.UNKNOWN]} unknown"
           + (f": no {', '.join(absent)}" if absent else "")]
    missing = [f.feature.name for f in report.features if f.fatal]
    if missing:
        out.append("  MISSING required: " + ", ".join(missing) + " (agentctl checkconfig)")
    return out


def _cells_lines(view: DaemonView) -> list[str]:
    if view.down is not None:
        return []
    out = []
    if view.ps is None:
        out.append("cells    ? (ps failed)")
    else:
        states: dict[str, int] = {}
        for row in view.ps:
            states[str(row.get("state"))] = states.get(str(row.get("state")), 0) + 1
        by = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        out.append(f"cells    {len(view.ps)}" + (f": {by}" if by else ""))
    budget = (view.status or {}).get("budget")
    if isinstance(budget, dict):
        def amt(a: Any) -> str:
            a = a if isinstance(a, dict) else {}
            return (f"cpu {a.get('cpu_m', 0) / 1000:.2f} mem {_size(a.get('memory', 0))} "
                    f"pids {a.get('pids', 0)}")
        out.append(f"budget   free {amt(budget.get('free'))}; used {amt(budget.get('committed'))}")
    elif budget is not None:
        out.append(f"budget   {budget}")
    return out


def _storage_lines(src: Sources) -> list[str]:
    cfg = src.config()
    state = src.p(cfg.state_dir)
    journal = state / "agent.journal"
    jsize = journal.stat().st_size if journal.exists() else 0
    total = sum(f.stat().st_size for f in state.rglob("*") if f.is_file()) if state.is_dir() else 0
    out = [f"journal  {_size(jsize)} (max {_size(cfg.journal_max_bytes)}); state dir "
           f"{cfg.state_dir} {_size(total)}"]
    disks, devs = [], set()
    for mount in ("/", str(cfg.state_dir)):
        try:
            dev = os.stat(src.p(mount)).st_dev
            v = os.statvfs(src.p(mount))
        except OSError:
            continue
        if dev in devs:
            continue
        devs.add(dev)
        disks.append(f"{mount} {_size(v.f_bavail * v.f_frsize)} free of "
                     f"{_size(v.f_blocks * v.f_frsize)}")
    out.append("disk     " + ("; ".join(disks) if disks else "?"))
    mem: dict[str, int] = {}
    for line in src.p("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.split():
            mem[key] = int(rest.split()[0]) * 1024
    out.append(f"memory   {_size(mem.get('MemAvailable', 0))} available of "
               f"{_size(mem.get('MemTotal', 0))}")
    return out


def _log_errors(src: Sources, n: int) -> list[str]:
    """The last ``n`` error lines of agentd's log (level letter E or C)."""
    try:
        text = src.p(LOG_PATH).read_text(errors="replace")
    except OSError:
        return []
    errs = [ln for ln in text.splitlines() if ln.split()[2:3] in (["E"], ["C"])]
    return errs[-n:] if n > 0 else []


def _event_line(ev: dict[str, Any]) -> str:
    try:
        when = time.strftime("%m-%d %H:%M:%S", time.localtime(float(ev.get("ts", 0))))
    except (TypeError, ValueError, OverflowError):
        when = "?"
    attrs = ev.get("attrs") or {}
    kv = " ".join(f"{k}={v}" for k, v in attrs.items()) if isinstance(attrs, dict) else ""
    return (f"  {when} {ev.get('severity', '?')!s:<6} {ev.get('channel', '?')} "
            f"{ev.get('cell') or '-'} {ev.get('kind', '?')} {kv}").rstrip()


def _guarded(name: str, fn: Callable[[], list[str]]) -> list[str]:
    try:
        return fn()
    except Exception as exc:
        return [f"{name:<8} error: {type(exc).__name__}: {exc}"]


def screen(src: Sources, view: DaemonView | None = None) -> list[str]:
    """The diag screen: at most HEIGHT lines, each at most WIDTH columns."""
    if view is None:
        view = query_daemon(src)
    host = src.uname().nodename
    now = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(src.clock()))
    lines = [f"agent {__version__} diag on {host} at {now}"]
    lines += _guarded("agentd", lambda: _daemon_lines(src, view))
    lines += _guarded("kernel", lambda: _kernel_lines(src, view))
    lines += _guarded("cells", lambda: _cells_lines(view))
    lines += _guarded("storage", lambda: _storage_lines(src))
    lines += [f"  ! {p}" for p in view.problems[:2]]
    footer = "more: agentctl checkconfig | events -f | diag --bundle"
    room = HEIGHT - len(lines) - 2
    errs = _guarded("log", lambda: _log_errors(src, 3))[: max(0, room // 2)]
    room -= 1 + len(errs) if errs else 0
    if view.down is None:
        evs = view.events[-max(0, room - 1):] if room > 1 else []
        lines.append(f"recent alerts/notices ({len(evs)}):" if evs else "recent alerts: none")
        lines += [_event_line(ev) for ev in evs]
    if errs:
        lines.append(f"agentd log errors ({LOG_PATH}, last {len(errs)}):")
        lines += ["  " + e for e in errs]
    lines.append(footer)
    return [_clip(x) for x in lines[:HEIGHT]]


# ------------------------------------------------------------------------------ bundle

@dataclass
class Bundle:
    """Members collected so far (name -> bytes), notes and collector errors."""

    members: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, name: str, data: bytes | str) -> None:
        self.members[name] = data.encode() if isinstance(data, str) else data

    def add_json(self, name: str, obj: Any) -> None:
        self.add(name, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def copy(self, src: Sources, path: Path | str, name: str | None = None) -> None:
        """Copy one file (at most 256K, the tail kept); ``*.key`` files are skipped."""
        real = src.p(path)
        member = name or f"files/{str(path).lstrip('/')}"
        if real.name.endswith(".key"):
            self.notes.append(f"skipped private key {path}")
            return
        with real.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > _MAX_FILE:
                f.seek(size - _MAX_FILE)
                self.notes.append(f"{path}: kept the last {_MAX_FILE} of {size} bytes")
            self.add(member, f.read(_MAX_FILE))


def _c_daemon(src: Sources, b: Bundle) -> None:
    client = src.connect()
    try:
        b.add_json("daemon/status.json", client.call("status"))
        rows = client.call("ps")
        b.add_json("daemon/ps.json", rows)
        for row in rows:
            name = str(row.get("name"))
            try:
                b.add_json(f"daemon/inspect/{name}.json", client.call("inspect", name=name))
            except AgentError as exc:
                b.errors.append(f"daemon: inspect {name}: {exc}")
        b.add_json("daemon/events.json", client.call("events", n=1000))
    finally:
        client.close()


def _c_checkconfig(src: Sources, b: Bundle) -> None:
    b.add_json("kernel/checkconfig.json", to_json(check(src.root, release=src.uname().release)))


def _c_kconfig(src: Sources, b: Bundle) -> None:
    uts = src.uname()
    lines = [f"release {uts.release}", f"version {uts.version}", f"machine {uts.machine}"]
    with contextlib.suppress(OSError):
        lines.append("cmdline " + src.p("/proc/cmdline").read_text().strip())
    found = load_config(src.root, uts.release)
    lines.append(f"config  {found[0] if found else 'not found'}")
    if found:
        lines += [f"CONFIG_{s}={found[1].get(s, 'not set')}" for s in fragment_symbols()]
    b.add("kernel/kconfig-summary.txt", "\n".join(lines) + "\n")


def _c_log(src: Sources, b: Bundle) -> None:
    if not src.p(LOG_PATH).exists():
        b.notes.append(f"no {LOG_PATH} (agentd not started by its init script?)")
        return
    b.copy(src, LOG_PATH, "agentd.log")


def _c_config(src: Sources, b: Bundle) -> None:
    cfg = src.config()
    seen: set[str] = set()
    for top in ("/etc/agent", str(cfg.policy_path), str(cfg.services_dir)):
        base = src.p(top)
        files = sorted(base.rglob("*")) if base.is_dir() else [base] if base.exists() else []
        for f in files:
            rel = "/" + str(f.relative_to(src.root))
            if f.is_file() and rel not in seen:
                seen.add(rel)
                b.copy(src, rel)
    if "/etc/agent/agentd.toml" not in seen:
        b.notes.append("no /etc/agent/agentd.toml: agentd runs on its defaults")


def _c_mounts(src: Sources, b: Bundle) -> None:
    b.copy(src, "/proc/self/mountinfo", "host/mountinfo")


def _c_net(src: Sources, b: Bundle) -> None:
    for argv in (["ip", "-j", "-d", "link"], ["ip", "-j", "addr"], ["bridge", "-j", "vlan", "show"],
                 ["nft", "-j", "list", "ruleset"]):
        name = "net/" + "-".join(a.lstrip("-") for a in argv if a not in ("-j", "-d")) + ".json"
        if src.which(argv[0]) is None:
            b.notes.append(f"{argv[0]} not installed: no {name}")
            continue
        r = src.run(argv)
        b.add(name, r.stdout)
        if r.returncode:
            b.errors.append(f"net: `{' '.join(argv)}` exited {r.returncode}: {r.stderr.strip()}")


def _cgroup_files(d: Path) -> Iterator[Path]:
    for f in sorted(d.iterdir()):
        if f.is_file() and (f.name in _CGROUP_KEYS or f.name.startswith(_CGROUP_PREFIXES)):
            yield f


def _c_cgroups(src: Sources, b: Bundle) -> None:
    top = src.p(src.config().cgroup_root)
    if not top.is_dir():
        b.add("cgroup-tree.txt", f"{src.config().cgroup_root}: does not exist\n")
        return
    out: list[str] = []
    for d in [top, *sorted(x for x in top.rglob("*") if x.is_dir())]:
        out.append(f"== /{d.relative_to(src.root)}")
        for f in _cgroup_files(d):
            try:
                text = f.read_text(errors="replace").rstrip("\n")
            except OSError as exc:  # e.g. memory.reclaim is write-only
                text = f"<{exc.strerror}>"
            body = text.replace("\n", "\n    ")
            out.append(f"  {f.name}:" + (f"\n    {body}" if "\n" in text else f" {text}"))
    b.add("cgroup-tree.txt", "\n".join(out) + "\n")


def _c_dmesg(src: Sources, b: Bundle) -> None:
    if src.which("dmesg") is None:
        b.notes.append("dmesg not installed")
        return
    r = src.run(["dmesg"])
    if r.returncode:
        raise RuntimeError(f"dmesg exited {r.returncode}: {r.stderr.strip()}")
    b.add("kernel/dmesg-tail.txt", "\n".join(r.stdout.splitlines()[-400:]) + "\n")


def _c_host(src: Sources, b: Bundle) -> None:
    vers = {"agent": __version__, "python": sys.version}
    for dist in ("pyroute2", "cbor2", "cgroupspy"):
        try:
            vers[dist] = version(dist)
        except PackageNotFoundError:
            vers[dist] = "not installed"
    b.add_json("versions.json", vers)
    for path in ("/proc/meminfo", "/proc/loadavg", "/proc/uptime", "/etc/os-release",
                 "/proc/pressure/cpu", "/proc/pressure/memory", "/proc/pressure/io"):
        with contextlib.suppress(OSError):
            b.copy(src, path, "host/" + path.strip("/").replace("/", "-"))


SECTIONS: tuple[tuple[str, Callable[[Sources, Bundle], None]], ...] = (
    ("daemon (status, ps, inspect, events)", _c_daemon),
    ("checkconfig", _c_checkconfig),
    ("kernel config summary", _c_kconfig),
    ("agentd log", _c_log),
    ("configuration and manifests", _c_config),
    ("mounts", _c_mounts),
    ("network (ip, bridge, nft)", _c_net),
    ("cgroup tree", _c_cgroups),
    ("dmesg", _c_dmesg),
    ("versions and host", _c_host),
)


def default_bundle_path(src: Sources) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(src.clock()))
    return Path(f"/tmp/agent-diag-{src.uname().nodename}-{stamp}.tar.gz")


def write_bundle(src: Sources, out: Path, progress: TextIO | None = None,
                 sections: tuple[tuple[str, Callable[[Sources, Bundle], None]], ...] = SECTIONS
                 ) -> Bundle:
    """Run every collector, then write ``out`` (atomically, mode 0600); one progress
    line per section on ``progress`` (default stderr)."""
    progress = progress or sys.stderr
    b = Bundle()
    for i, (title, fn) in enumerate(sections, 1):
        print(f"diag: [{i}/{len(sections)}] {title} ...", end="", file=progress, flush=True)
        before, errs = len(b.members), len(b.errors)
        try:
            fn(src, b)
        except Exception as exc:
            b.errors.append(f"{title}: {type(exc).__name__}: {exc}")
        status = "ok" if len(b.errors) == errs else "ERROR (see errors.txt)"
        print(f" {status}, {len(b.members) - before} files", file=progress, flush=True)
    b.add("summary.txt", "\n".join(_guarded("screen", lambda: screen(src))) + "\n")
    b.add("errors.txt", "".join(e + "\n" for e in b.errors) or "no errors\n")
    b.add("index.txt", "".join(f"{n}\n" for n in sorted(b.members))
          + "".join(f"note: {n}\n" for n in b.notes))
    top = out.name.removesuffix(".tar.gz")
    tmp = out.with_name(f".{out.name}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
            for name, data in sorted(b.members.items()):
                info = tarfile.TarInfo(f"{top}/{name}")
                info.size, info.mtime, info.mode = len(data), int(src.clock()), 0o600
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return b


# ------------------------------------------------------------------------------ CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agentctl diag",
        description="One screen for the serial console, or a diagnostic bundle.",
        epilog="exit status: 0 done, 1 the bundle could not be written, 2 usage")
    p.add_argument("--bundle", nargs="?", const="", type=str, metavar="FILE",
                   help="write a tar.gz for a bug report (default "
                        "/tmp/agent-diag-<host>-<timestamp>.tar.gz)")
    p.add_argument("--socket", type=Path,
                   default=Path(os.environ.get("AGENT_SOCKET", str(DEFAULT_SOCKET))),
                   metavar="PATH", help="agentd control socket")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                   help="read /proc, /sys, /etc and /var under DIR (default /)")
    return p


def cli_main(argv: list[str]) -> int:
    ns = parse(_parser(), argv)
    if isinstance(ns, int):
        return ns
    src = Sources(root=ns.root, socket=ns.socket, timeout=ns.timeout)
    if ns.bundle is None:
        sys.stdout.write("\n".join(screen(src)) + "\n")
        return 0
    out = Path(ns.bundle) if ns.bundle else default_bundle_path(src)
    try:
        b = write_bundle(src, out)
    except OSError as exc:
        print(f"agentctl: error[E_DIAG]: cannot write `{out}`: {exc.strerror}", file=sys.stderr)
        print("hint: pass --bundle FILE on a writable filesystem", file=sys.stderr)
        return 1
    print(f"{out} ({len(b.members)} files, {len(b.errors)} collector errors)")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
