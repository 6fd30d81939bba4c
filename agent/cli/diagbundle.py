"""``agentctl diag --bundle``: guarded collectors and the tar.gz for a bug report
(see :mod:`agent.cli.diag`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TextIO

from agent import __version__
from agent.cli.diagscreen import LOG_PATH, Sources, guarded, screen
from agent.core.errors import AgentError
from agent.core.features import to_json
from agent.core.kconfig import fragment_symbols
from agent.kernel.probes import check, load_config

__all__ = ["SECTIONS", "Bundle", "default_bundle_path", "write_bundle"]

_CGROUP_KEYS = ("cgroup.controllers", "cgroup.subtree_control", "cgroup.events", "cgroup.procs",
                "cpu.max", "cpu.weight", "cpu.stat", "io.weight")
_CGROUP_PREFIXES = ("memory.", "pids.")
_MAX_FILE = 256 << 10



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
    b.add("summary.txt", "\n".join(guarded("screen", lambda: screen(src))) + "\n")
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


