"""``agentctl``: the operator CLI (often used over a serial console, so 80 columns).

Exit codes (docs/cli.md): 0 ok; 1 the daemon replied with an error; 2 usage error;
3 the daemon cannot be reached; 4 protocol error or timeout.

Nothing a cell or a reply controls reaches the terminal raw: every human line goes
through :func:`agent.core.tty.escape` once, before it is cut to 80 columns (the views
in :mod:`agent.cli.views`), error lines too, and ``--json`` is pure ASCII
(:func:`agent.core.tty.json_text`).  ``logs --raw`` alone writes a cell's bytes as
they are.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
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
from agent.cli.client import Client, ConnectError, RemoteError, TransportError
from agent.cli.pstree import format_tree
from agent.cli.views import (
    format_event,
    format_inspect,
    format_log_line,
    format_ps,
    format_status,
    show,
    text,
)
from agent.core.args import parse
from agent.core.errors import AgentError
from agent.core.tty import escape, json_text

__all__ = [
    "EXIT_CONNECT",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_PROTOCOL",
    "EXIT_USAGE",
    "format_event",
    "format_inspect",
    "format_log_line",
    "format_ps",
    "format_status",
    "main",
]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONNECT, EXIT_PROTOCOL = 0, 1, 2, 3, 4
DEFAULT_SOCKET = os.environ.get("AGENT_SOCKET", "/run/agent/agentd.sock")


# --------------------------------------------------------------------------- commands

def _cmd_ping(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    t0 = time.monotonic()
    result = client.call("ping")
    ms = (time.monotonic() - t0) * 1000
    if ns.json:
        print(json_text(result), file=out)
    else:
        print(show(f"{text(result)} ({ms:.1f} ms)"), file=out)
    return EXIT_OK


def _cmd_status(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    result = client.call("status")
    if ns.json:
        print(json_text(result, indent=2, sort_keys=True), file=out)
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
    if ns.persisted and ns.follow:
        print("agentctl: error[E_USAGE]: --persisted and --follow do not go together",
              file=sys.stderr)
        print("hint: --persisted reads the log on flash; -f follows the live bus",
              file=sys.stderr)
        return EXIT_USAGE
    if ns.follow:
        client.timeout = None
        for item in client.stream("events.follow", **_event_args(ns)):
            if ns.json:
                print(json_text(item), file=out, flush=True)
            elif isinstance(item, dict) and "dropped" in item and "kind" not in item:
                print(show(f"-- {text(item['dropped'])} events dropped (too slow) --"),
                      file=out, flush=True)
            else:
                print(format_event(item), file=out, flush=True)
        return EXIT_OK
    result = client.call("events.log" if ns.persisted else "events", **_event_args(ns))
    if ns.json:
        print(json_text(result, indent=2), file=out)
    else:
        for ev in result:
            print(format_event(ev), file=out)
    return EXIT_OK


def _cmd_respawn(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    """Re-make the master from the installed image (docs/master.md); ``--check`` only
    compares the installed agent with its seal."""
    if ns.check:
        result = client.call("respawn", check=True)
        diffs = result.get("differences") or []
        if ns.json:
            print(json_text(result, indent=2), file=out)
        elif not result.get("sealed"):
            print("no seal installed (a development tree): nothing to check against",
                  file=out)
        elif not diffs:
            print("the installed agent matches its seal", file=out)
        else:
            print(show(f"{len(diffs)} installed files differ from the seal:"), file=out)
            for line in diffs:
                print(show(f"  {text(line)}"), file=out)
        return EXIT_ERROR if diffs else EXIT_OK
    result = client.call("respawn")
    if ns.json:
        print(json_text(result, indent=2), file=out)
    else:
        print(show(f"agentd (pid {text(result.get('pid'))}) is re-made from the installed "
                   "image; its cells keep running"), file=out)
    return EXIT_OK


def _long(client: Client, ns: argparse.Namespace) -> None:
    """run and stop wait for the cell: 60 s unless --timeout says otherwise."""
    if ns.timeout is None:
        client.timeout = 60.0


def _cmd_run(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    _long(client, ns)
    result = client.call("run", name=ns.name, **({"dry_run": True} if ns.dry_run else {}))
    if ns.json:
        print(json_text(result, indent=2), file=out)
    elif ns.dry_run:
        print("\n".join(show(text(x)) for x in result.get("plan", [])), file=out)
    else:
        where = (f" on VLAN {text(result['vlan'])} at {text(result.get('address'))}"
                 if result.get("vlan") else "")
        print(show(f"{text(result['name'])}: {text(result['state'])}, pid "
                    f"{text(result.get('pid') or '-')}{where}"), file=out)
    return EXIT_OK


def _cmd_stop(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    _long(client, ns)
    result = client.call("stop", name=ns.name)
    print(json_text(result) if ns.json else
          show(f"{text(result['name'])}: {text(result['state'])}"), file=out)
    return EXIT_OK


def _cmd_ps(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    if ns.tree:
        d = client.call("ps", tree=ns.tree)
        print(json_text(d, indent=2) if ns.json else "\n".join(format_tree(d)), file=out)
        return EXIT_OK
    rows = client.call("ps")
    print(json_text(rows, indent=2) if ns.json else "\n".join(format_ps(rows)), file=out)
    return EXIT_OK


def _cmd_inspect(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    d = client.call("inspect", name=ns.name)
    print(json_text(d, indent=2) if ns.json else "\n".join(format_inspect(d)), file=out)
    return EXIT_OK


def _logs(client: Client, args: dict[str, Any], raw: bool) -> Any:
    """The ``logs`` op, asking for each line's bytes with ``raw``; an agentd that does
    not know the argument yet is asked again without it (lines then come as text)."""
    if raw:
        try:
            return client.call("logs", **args, raw=True)
        except RemoteError as exc:
            if exc.code != "E_ARGS" or "`raw`" not in exc.message:
                raise
    return client.call("logs", **args)


def _write_raw(lines: list[Any], out: TextIO) -> None:
    """``logs --raw``: each line's bytes as the cell wrote them, then a newline."""
    out.flush()
    sink = getattr(out, "buffer", None)
    for x in lines:
        raw = x.get("raw") if isinstance(x, dict) else None
        if not isinstance(raw, bytes):  # an agentd that sends text only
            raw = text(x.get("line", "") if isinstance(x, dict) else x).encode(
                "utf-8", "surrogateescape")
        if sink is not None:
            sink.write(raw + b"\n")
        else:  # a text-only stream (tests)
            out.write(raw.decode("utf-8", "surrogateescape") + "\n")
    if sink is not None:
        sink.flush()


def _cmd_logs(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    args: dict[str, Any] = {"name": ns.name, "n": ns.n}
    if ns.stream:
        args["stream"] = ns.stream
    d = _logs(client, args, raw=ns.raw or not ns.json)
    if ns.json:
        print(json_text(d, indent=2), file=out)
        return EXIT_OK
    lines = d.get("lines") if isinstance(d, dict) else None
    lines = lines if isinstance(lines, list) else []
    if ns.raw:
        _write_raw(lines, out)
    else:
        for x in lines:
            print(format_log_line(x), file=out)
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
        print(escape(f"agentctl: error[E_UNAVAILABLE]: {command} is not available: {exc}"),
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
_SHAPE_ERRORS = (TypeError, ValueError, AttributeError, KeyError, IndexError)


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
    sp.add_argument("--persisted", action="store_true",
                    help="from the event log on flash (alerts and state changes, also of "
                         "earlier agentd instances: a crash or a respawn)")
    sp.set_defaults(func=_cmd_events)
    sp = sub.add_parser("respawn", parents=[common],
                        help="re-make agentd from the installed image (cells keep running)")
    sp.add_argument("--check", action="store_true",
                    help="only compare the installed agent with its seal")
    sp.set_defaults(func=_cmd_respawn)
    sp = sub.add_parser("run", parents=[common], help="create a cell for a service")
    sp.add_argument("name", help="service name (a manifest in agentd's services dir)")
    sp.add_argument("--dry-run", action="store_true",
                    help="check policy, image and admission; print the plan, change nothing")
    sp.set_defaults(func=_cmd_run)
    sp = sub.add_parser("stop", parents=[common], help="stop a cell and free everything")
    sp.add_argument("name")
    sp.set_defaults(func=_cmd_stop)
    sp = sub.add_parser("ps", parents=[common], help="one line per cell")
    sp.add_argument("--tree", metavar="NAME", help="the process tree of cell NAME")
    sp.set_defaults(func=_cmd_ps)
    sp = sub.add_parser("inspect", parents=[common],
                        help="a cell's manifest, allocation, plan, limits, seccomp, events")
    sp.add_argument("name")
    sp.set_defaults(func=_cmd_inspect)
    sp = sub.add_parser("logs", parents=[common], help="a cell's last output lines")
    sp.add_argument("name")
    sp.add_argument("-n", type=count, default=50, metavar="N", help="how many (default 50)")
    sp.add_argument("--stream", choices=("stdout", "stderr"), help="only this stream")
    sp.add_argument("--raw", action="store_true",
                    help="write the lines' bytes as the cell wrote them, control characters "
                         "and all (default: escaped, as journalctl does)")
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
            try:
                return func(client, ns, sys.stdout)
            except _SHAPE_ERRORS as exc:  # a result of a shape the formatter did not expect
                raise TransportError(
                    "E_PROTOCOL", f"unexpected reply: {type(exc).__name__}: {exc}",
                    "agentd and agentctl may be of different versions; --json shows the "
                    "reply") from exc
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `agentctl events | head`
        with contextlib.suppress(OSError):  # avoid a second EPIPE when Python exits
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except AgentError as exc:
        if ns.debug:
            sys.stderr.write("".join(escape(x, keep_tab=True) + "\n"
                                     for x in traceback.format_exc().rstrip("\n").split("\n")))
        print(f"agentctl: error[{escape(text(exc.code))}]: {escape(text(exc.message))}",
              file=sys.stderr)
        if exc.hint:
            print(f"hint: {escape(text(exc.hint))}", file=sys.stderr)
        if isinstance(exc, ConnectError):
            return EXIT_CONNECT
        if isinstance(exc, TransportError):
            return EXIT_PROTOCOL
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
