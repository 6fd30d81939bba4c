"""``agentctl``: the operator CLI (often used over a serial console, so 80 columns).

Exit codes (docs/cli.md): 0 ok; 1 the daemon replied with an error; 2 usage error;
3 the daemon cannot be reached; 4 protocol error or timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from agent import __version__
from agent.cli import patternsctl
from agent.cli import top as clitop
from agent.cli.client import Client, ConnectError, TransportError
from agent.core.args import parse
from agent.core.errors import AgentError

__all__ = [
    "EXIT_CONNECT",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_PROTOCOL",
    "EXIT_USAGE",
    "format_event",
    "format_inspect",
    "format_ps",
    "format_status",
    "main",
]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONNECT, EXIT_PROTOCOL = 0, 1, 2, 3, 4
WIDTH = 80
DEFAULT_SOCKET = os.environ.get("AGENT_SOCKET", "/run/agent/agentd.sock")


def _clip(line: str, width: int = WIDTH) -> str:
    return line if len(line) <= width else line[: width - 3] + "..."


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + (f"{h}h" if d or h else "") + (f"{m:02d}m" if d or h or m
                                                                   else "") + f"{s:02d}s"


def format_status(st: dict[str, Any]) -> list[str]:
    """Human lines for a status result; known keys first, then any others."""
    lines = [
        f"agentd {st.get('version', '?')}  pid {st.get('pid', '?')}  "
        f"up {_duration(float(st.get('uptime_s', 0)))}",
        f"kernel    {st.get('kernel', '?')} ({st.get('machine', '?')})",
        f"cgroup    {st.get('cgroup', '?')}",
        f"cells     {st.get('cells', '?')}",
        f"events    {st.get('events', '?')}",
    ]
    known = {"version", "pid", "uptime_s", "kernel", "machine", "cgroup", "cells", "events"}
    budget = st.get("budget")
    if isinstance(budget, dict) and all(isinstance(budget.get(k), dict) for k in
                                        ("capacity", "reserve", "committed", "free")):
        known.add("budget")
        lines += format_budget(budget)
    for key in sorted(k for k in st if k not in known):
        value = st[key]
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        lines.append(f"{key:<9} {text}")
    return [_clip(line) for line in lines]


def format_budget(b: dict[str, Any]) -> list[str]:
    """The budget block of ``status``: per resource what is free of the capacity, what
    the host keeps and what cells hold; then cells by state and address leases."""
    fmt: dict[str, Callable[[int], str]] = {
        "cpu_m": lambda n: f"{n}m", "memory": lambda n: f"{n / (1 << 20):.1f} MiB",
        "pids": str}
    lines = []
    for key, label in (("cpu_m", "cpu"), ("memory", "memory"), ("pids", "pids")):
        try:
            f = fmt[key]
            lines.append(f"  {label:<7} free {f(int(b['free'][key]))} of "
                         f"{f(int(b['capacity'][key]))} (host keeps "
                         f"{f(int(b['reserve'][key]))}, cells hold "
                         f"{f(int(b['committed'][key]))})")
        except (KeyError, TypeError, ValueError):
            continue
    states = b.get("states")
    if isinstance(states, dict) and states:
        lines.append("  cells   " + ", ".join(f"{v} {k}" for k, v in sorted(states.items())))
    if "leases" in b:
        lines.append(f"  leases  {b['leases']}")
    return ["budget", *lines]


def format_event(ev: dict[str, Any]) -> str:
    """One event on one line: time, severity, channel, cell, kind and attributes."""
    ts = ev.get("ts", 0.0)
    try:
        when = time.strftime("%m-%d %H:%M:%S", time.localtime(float(ts)))
        when += f".{int(float(ts) * 1000) % 1000:03d}"
    except (TypeError, ValueError, OverflowError):
        when = "?"
    attrs = ev.get("attrs") or {}
    kv = " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                  for k, v in (attrs.items() if isinstance(attrs, dict) else ()))
    line = (f"{when} {ev.get('severity', '?')!s:<6} {ev.get('channel', '?')!s:<9} "
            f"{ev.get('cell') or '-'!s:<10} {ev.get('kind', '?')} {kv}")
    return _clip(line.rstrip())


# --------------------------------------------------------------------------- commands

def _cmd_ping(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    t0 = time.monotonic()
    result = client.call("ping")
    ms = (time.monotonic() - t0) * 1000
    if ns.json:
        print(json.dumps(result), file=out)
    else:
        print(f"{result} ({ms:.1f} ms)", file=out)
    return EXIT_OK


def _cmd_status(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    result = client.call("status")
    if ns.json:
        print(json.dumps(result, indent=2, sort_keys=True), file=out)
    else:
        print("\n".join(format_status(result)), file=out)
    return EXIT_OK


def _event_args(ns: argparse.Namespace) -> dict[str, Any]:
    args: dict[str, Any] = {"n": ns.n}
    for name in ("cell", "channel", "kind", "severity"):
        if getattr(ns, name) is not None:
            args[name] = getattr(ns, name)
    return args


def _cmd_events(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    if ns.follow:
        client.timeout = None
        for item in client.stream("events.follow", **_event_args(ns)):
            if ns.json:
                print(json.dumps(item), file=out, flush=True)
            elif "dropped" in item and "kind" not in item:
                print(f"-- {item['dropped']} events dropped (too slow) --", file=out, flush=True)
            else:
                print(format_event(item), file=out, flush=True)
        return EXIT_OK
    result = client.call("events", **_event_args(ns))
    if ns.json:
        print(json.dumps(result, indent=2), file=out)
    else:
        for ev in result:
            print(format_event(ev), file=out)
    return EXIT_OK


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}{unit}"
    return str(n)


def format_ps(rows: list[dict[str, Any]]) -> list[str]:
    """One line per cell, 80 columns: name state vlan address cpu memory pids up restarts."""
    lines = [f"{'NAME':<13} {'STATE':<9} {'VLAN':>4} {'ADDRESS':<15} {'CPU%':>5} "
             f"{'MEM/MAX':>12} {'PIDS':>4} {'UP':>7} {'R':>2}"]
    for r in rows:
        cpu = r.get("cpu_pct")
        mem = f"{_size(r.get('memory_current'))}/{_size(r.get('memory_max'))}"
        up = r.get("uptime_s")
        pids = r.get("pids")
        lines.append(
            f"{str(r.get('name', '?'))[:13]:<13} {str(r.get('state', '?'))[:9]:<9} "
            f"{r.get('vlan') if r.get('vlan') is not None else '-':>4} "
            f"{r.get('address') or '-':<15} {'-' if cpu is None else f'{cpu:.1f}':>5} "
            f"{mem:>12} {'-' if pids is None else pids:>4} "
            f"{'-' if up is None else _duration(float(up)):>7} {r.get('restarts', 0):>2}")
    return [_clip(x) for x in lines]


def format_inspect(d: dict[str, Any]) -> list[str]:
    """The human view of ``inspect``: record, allocation, limits, plan, seccomp, events."""
    alloc = d.get("allocation") or {}
    lines = [f"cell      {d.get('name')}  state {d.get('state')}  pid {d.get('pid') or '-'}",
             f"image     {(d.get('manifest') or {}).get('image', {}).get('root', '?')}",
             f"network   vlan {alloc.get('vlan') or '-'}  address {alloc.get('address') or '-'}"
             f"  gateway {alloc.get('gateway') or '-'}",
             f"cgroup    {d.get('cgroup')}"]
    lim = d.get("limits") or {}
    lines.append("limits    " + " ".join(f"{k}={v}" for k, v in lim.items() if v is not None))
    if d.get("error"):
        lines.append(f"error     {d['error']}")
    lines += ["", "plan:"] + [f"  {x}" for x in d.get("plan") or ["(none: adopted)"]]
    lines += ["", "seccomp:"] + [f"  {r[0]:<16} {r[1]:>4} {r[2]:<14} {r[3]}"
                                 for r in d.get("seccomp") or []]
    lines += ["", "events:"] + [format_event(ev) for ev in d.get("events") or []]
    return [_clip(x) for x in lines]


def _long(client: Client, ns: argparse.Namespace) -> None:
    """run and stop wait for the cell: 60 s unless --timeout says otherwise."""
    if ns.timeout is None:
        client.timeout = 60.0


def _cmd_run(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    _long(client, ns)
    result = client.call("run", name=ns.name, **({"dry_run": True} if ns.dry_run else {}))
    if ns.json:
        print(json.dumps(result, indent=2), file=out)
    elif ns.dry_run:
        print("\n".join(_clip(x) for x in result.get("plan", [])), file=out)
    else:
        where = f" on VLAN {result['vlan']} at {result['address']}" if result.get("vlan") else ""
        print(_clip(f"{result['name']}: {result['state']}, pid {result.get('pid') or '-'}"
                    f"{where}"), file=out)
    return EXIT_OK


def _cmd_stop(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    _long(client, ns)
    result = client.call("stop", name=ns.name)
    print(json.dumps(result) if ns.json else f"{result['name']}: {result['state']}", file=out)
    return EXIT_OK


def _cmd_ps(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    rows = client.call("ps")
    print(json.dumps(rows, indent=2) if ns.json else "\n".join(format_ps(rows)), file=out)
    return EXIT_OK


def _cmd_inspect(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    d = client.call("inspect", name=ns.name)
    print(json.dumps(d, indent=2) if ns.json else "\n".join(format_inspect(d)), file=out)
    return EXIT_OK


def _cmd_logs(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    args: dict[str, Any] = {"name": ns.name, "n": ns.n}
    if ns.stream:
        args["stream"] = ns.stream
    d = client.call("logs", **args)
    if ns.json:
        print(json.dumps(d, indent=2), file=out)
        return EXIT_OK
    for x in d.get("lines", []):
        mark = "!" if x.get("stream") == "stderr" else " "
        print(f"{mark}{x.get('line', '')}", file=out)
    return EXIT_OK


PASSTHROUGH = {
    "checkconfig": "agent.cli.checkconfig",
    "diag": "agent.cli.diag",
}


def _cmd_passthrough(command: str, argv: list[str]) -> int:
    """``checkconfig`` and ``diag`` parse their own arguments (``agentctl diag --help``)."""
    module = PASSTHROUGH[command]
    try:
        cli_main = importlib.import_module(module).cli_main
    except (ImportError, AttributeError) as exc:
        print(f"agentctl: error[E_UNAVAILABLE]: {command} is not available: {exc}",
              file=sys.stderr)
        print(f"hint: this build lacks {module}; reinstall the agent package",
              file=sys.stderr)
        return EXIT_ERROR
    try:
        return int(cli_main(argv))
    except SystemExit as exc:  # an argparse inside the module
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


Command = Callable[[Client, argparse.Namespace, TextIO], int]


def _common(p: argparse.ArgumentParser, *, top: bool) -> None:
    """Global options; also accepted after the subcommand (``agentctl status --json``)."""
    def d(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    p.add_argument("--socket", type=Path, default=d(Path(DEFAULT_SOCKET)), metavar="PATH",
                   help=f"agentd control socket (default {DEFAULT_SOCKET}; env AGENT_SOCKET)")
    p.add_argument("--json", action="store_true", default=d(False),
                   help="print the raw result as JSON")
    p.add_argument("--debug", action="store_true", default=d(False),
                   help="show tracebacks on errors")
    p.add_argument("--timeout", type=float, default=d(None), metavar="SECONDS",
                   help="reply timeout in seconds (default 5; run and stop: 60)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agentctl", description="Drive and diagnose agentd.",
        epilog="exit codes: 0 ok, 1 daemon error, 2 usage, 3 daemon unreachable, "
               "4 protocol error or timeout")
    p.add_argument("--version", action="version", version=f"agentctl {__version__}")
    _common(p, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _common(common, top=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sp = sub.add_parser("status", parents=[common],
                        help="daemon version, uptime, kernel, cgroup mode, counts")
    sp.set_defaults(func=_cmd_status)
    sp = sub.add_parser("ping", parents=[common],
                        help="check that agentd answers")
    sp.set_defaults(func=_cmd_ping)
    sp = sub.add_parser("events", parents=[common],
                        help="recent events (newest last)")
    sp.add_argument("-n", type=count, default=20, metavar="N", help="how many (default 20)")
    sp.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    sp.add_argument("--cell", help="only this cell")
    sp.add_argument("--channel", help="only this channel (shell pattern)")
    sp.add_argument("-k", "--kind", help="only this kind (shell pattern, e.g. 'resize*')")
    sp.add_argument("--severity", choices=("info", "notice", "alert"),
                    help="at least this severity")
    sp.set_defaults(func=_cmd_events)
    sp = sub.add_parser("run", parents=[common], help="create a cell for a service")
    sp.add_argument("name", help="service name (a manifest in agentd's services dir)")
    sp.add_argument("--dry-run", action="store_true",
                    help="check policy, image and admission; print the plan, change nothing")
    sp.set_defaults(func=_cmd_run)
    sp = sub.add_parser("stop", parents=[common], help="stop a cell and free everything")
    sp.add_argument("name")
    sp.set_defaults(func=_cmd_stop)
    sp = sub.add_parser("ps", parents=[common], help="one line per cell")
    sp.set_defaults(func=_cmd_ps)
    sp = sub.add_parser("inspect", parents=[common],
                        help="a cell's manifest, allocation, plan, limits, seccomp, events")
    sp.add_argument("name")
    sp.set_defaults(func=_cmd_inspect)
    sp = sub.add_parser("logs", parents=[common], help="a cell's last output lines")
    sp.add_argument("name")
    sp.add_argument("-n", type=count, default=50, metavar="N", help="how many (default 50)")
    sp.add_argument("--stream", choices=("stdout", "stderr"), help="only this stream")
    sp.set_defaults(func=_cmd_logs)
    clitop.add_parsers(sub, common)  # top, pin, unpin
    patternsctl.add_parsers(sub, common)  # patterns [list|install|rollback]
    sp = sub.add_parser("checkconfig", add_help=False,
                        help="kernel features the agent uses: present, degraded, missing")
    sp.set_defaults(func=None)
    sp = sub.add_parser("diag", add_help=False,
                        help="one screen for a serial console; --bundle FILE for a report")
    sp.set_defaults(func=None)
    return p


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Split ``[globals] checkconfig|diag [its args]``: everything after the command goes
    to its module untouched (argparse would try to parse its options)."""
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("--socket", "--timeout"):
            i += 2
            continue
        if tok.startswith("-"):
            i += 1
            continue
        if tok in PASSTHROUGH:
            return argv[: i + 1], argv[i + 1 :]
        break
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, passthrough = _split_passthrough(list(sys.argv[1:] if argv is None else argv))
    ns = parse(parser, args)
    if isinstance(ns, int):
        return ns
    if ns.command in PASSTHROUGH:
        return _cmd_passthrough(ns.command, passthrough or [])
    func: Command = ns.func
    client = Client(ns.socket, timeout=5.0 if ns.timeout is None else ns.timeout)
    try:
        with client:
            return func(client, ns, sys.stdout)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `agentctl events | head`
        with contextlib.suppress(OSError):  # avoid a second EPIPE when Python exits
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except AgentError as exc:
        if ns.debug:
            traceback.print_exc()
        print(f"agentctl: error[{exc.code}]: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        if isinstance(exc, ConnectError):
            return EXIT_CONNECT
        if isinstance(exc, TransportError):
            return EXIT_PROTOCOL
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
