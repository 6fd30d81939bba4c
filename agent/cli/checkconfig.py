"""``agentctl checkconfig``: what the running kernel offers the agent.

Like lxc-checkconfig: read the kernel configuration (``/proc/config.gz`` or
``/boot/config-<release>``), probe the live kernel through ``/proc`` and
``/sys``, and report each feature of ``agent.core.kconfig.FEATURES`` as present,
degraded, missing or unknown, with the consequence for the agent.

Combining the two sources (the probe speaks for the running kernel, the
config for what was built):

* probe ok      -> present (degraded if the config lacks a wanted option);
* probe partial -> degraded (built, but not usable as the agent wants);
* probe fails   -> missing;
* no probe, or the probe cannot tell -> what the config says; unknown
  without a config.

Every probe takes the filesystem root as a parameter, so the same code runs
against the live kernel (``/``) and against a directory tree in tests.
Exit status of :func:`cli_main`: 0 when every required feature is present
or degraded, 1 when a required feature is missing, 2 on a usage error or an
unreadable ``--config``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from agent.core.args import parse
from agent.core.errors import AgentError
from agent.core.features import Report, to_json
from agent.core.kconfig import (
    Status,
    parse_config,
    parse_config_gz,
)
from agent.core.tty import escape, json_text
from agent.kernel.probes import check

__all__ = ["cli_main", "render"]


_MARK = {Status.PRESENT: "present", Status.DEGRADED: "DEGRADED",
         Status.MISSING: "MISSING", Status.UNKNOWN: "unknown"}


def render(report: Report, width: int = 80) -> str:
    """lxc-checkconfig-like text, lines at most ``width`` columns (each escaped: a
    release string, a path or a probe's detail cannot drive the terminal)."""
    source = report.config_source or "not found (probes only)"
    lines = [f"Kernel {report.release}"]
    if len(source) + 8 > width:  # a long path goes on its own line, unbroken
        lines += ["Config:", f"  {source}", ""]
    else:
        lines += [f"Config: {source}", ""]
    for f in report.features:
        tag = "*" if f.feature.required else " "
        head = f"{tag} {f.feature.title}"
        mark = _MARK[f.status]
        dots = max(1, width - len(head) - len(mark) - 2)
        if len(head) + len(mark) + 2 > width:
            head = head[: width - len(mark) - 3]
            dots = 1
        lines.append(f"{head} {'.' * dots} {mark}"[:width])
        extra = []
        if f.detail:
            extra.append(f.detail)
        if f.status is Status.MISSING:
            extra.append("-> " + f.feature.consequence)
        elif f.status is Status.DEGRADED:
            extra.append("-> " + f.feature.degraded_consequence)
        for e in extra:
            lines.extend(textwrap.wrap(e, width=width, initial_indent="    ",
                                       subsequent_indent="      "))
    lines.append("")
    lines.append("* required: checkconfig exits 1 when one of these is missing")
    missing = [f.feature.name for f in report.features if f.fatal]
    lines.append("Result: " + ("ok" if not missing else "missing " + ", ".join(missing)))
    return "".join(escape(x) + "\n" for x in lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agentctl checkconfig",
        description="Report the kernel features the agent uses: present, degraded, missing.",
        epilog="exit status: 0 all required features usable, 1 a required feature is "
               "missing, 2 usage error or unreadable --config")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="kernel .config (plain or gzip) instead of the running kernel's")
    p.add_argument("--root", type=Path, metavar="DIR",
                   help="probe /proc and /sys under DIR (default /; with --config and "
                        "no --root the config is judged alone, without probes)")
    p.add_argument("--release", metavar="RELEASE", help="kernel release (default uname -r)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def cli_main(argv: list[str]) -> int:
    ns = parse(_parser(), argv)
    if isinstance(ns, int):
        return ns
    config: dict[str, str] | None = None
    source: str | None = None
    try:
        if ns.config is not None:
            data = ns.config.read_bytes()
            config = parse_config_gz(data) if data[:2] == b"\x1f\x8b" else parse_config(
                data.decode("utf-8", errors="replace"))
            source = str(ns.config)
    except OSError as exc:
        print(escape(f"agentctl: error[E_KCONFIG]: cannot read `{ns.config}`: "
                     f"{exc.strerror}"), file=sys.stderr)
        return 2
    except AgentError as exc:
        print(escape(f"agentctl: {exc}"), file=sys.stderr)
        return 2
    probe = ns.root is not None or ns.config is None
    report = check(ns.root or Path("/"), config, source, ns.release, probe=probe)
    if ns.json:
        print(json_text(to_json(report), indent=2))
    else:
        sys.stdout.write(render(report))
    return 0 if report.ok else 1
