"""``agentctl diag``'s screen: where it reads (:class:`Sources`: a root for every path,
a client for the daemon), what it asks the daemon, and the 24-line, 80-column screen
(see :mod:`agent.cli.diag`).  Every line of the screen is escaped
(:func:`agent.core.tty.escape`) before it is cut to 80 columns: events, errors, the log's
lines and the daemon's answers are shown, never obeyed, by the terminal.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent import __version__
from agent.cli.client import DEFAULT_SOCKET, Client, ConnectError, TransportError
from agent.core.config import AgentConfig
from agent.core.config import load_config as load_agent_config
from agent.core.errors import AgentError
from agent.core.kconfig import Status
from agent.core.tty import escape
from agent.kernel.cgroupdetect import detect
from agent.kernel.probes import check

__all__ = ["HEIGHT", "LOG_PATH", "PIDFILE", "WIDTH", "DaemonClient", "DaemonView", "Sources",
           "guarded", "query_daemon", "screen"]

WIDTH, HEIGHT = 80, 24
LOG_PATH = "/var/log/agentd.log"
PIDFILE = "/var/run/agentd.pid"


class DaemonClient(Protocol):
    """What diag needs of :class:`agent.cli.client.Client`."""

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
    line = escape(line)
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
        text = src.p(LOG_PATH).read_bytes().decode("utf-8", "surrogateescape")
    except OSError:
        return []
    errs = [ln for ln in text.split("\n") if ln.split()[2:3] in (["E"], ["C"])]
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


def guarded(name: str, fn: Callable[[], list[str]]) -> list[str]:
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
    lines += guarded("agentd", lambda: _daemon_lines(src, view))
    lines += guarded("kernel", lambda: _kernel_lines(src, view))
    lines += guarded("cells", lambda: _cells_lines(view))
    lines += guarded("storage", lambda: _storage_lines(src))
    lines += [f"  ! {p}" for p in view.problems[:2]]
    footer = "more: agentctl checkconfig | events -f | diag --bundle"
    room = HEIGHT - len(lines) - 2
    errs = guarded("log", lambda: _log_errors(src, 3))[: max(0, room // 2)]
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


