"""``agentctl patterns``: what channel 4 has loaded, and installing or rolling back a
pattern bundle (registered by agent.cli.main; docs/patterns.md, "agentctl patterns").

::

    agentctl patterns [list] [--name NAME]      version, signer, counters, each pattern
    agentctl patterns install BUNDLE [--sig SIG]  a signed bundle (SIG: BUNDLE.sig)
    agentctl patterns rollback                  back to the bundle before

A bundle goes over the control socket in chunks (a request is one 64 KiB frame); agentd
checks it exactly as one its update directory received.  This module imports nothing of
the engine (no PyNaCl): agentctl stays quick to start on a box.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, TextIO

from agent.cli.client import Client
from agent.core.errors import AgentError

__all__ = ["CHUNK", "add_parsers", "cmd_patterns", "format_patterns", "install"]

CHUNK = 48 << 10  # bundle bytes per request: room left for the signature and envelope
WIDTH = 80


def _clip(line: str) -> str:
    return line if len(line) <= WIDTH else line[: WIDTH - 3] + "..."


def _when(ts: Any) -> str:
    try:
        return time.strftime("%m-%d %H:%M:%S", time.localtime(float(ts)))
    except (TypeError, ValueError, OverflowError):
        return "?"


def format_patterns(d: dict[str, Any]) -> list[str]:
    """The listing: the bundle, the counters, one line per pattern, the last alerts."""
    lines = [f"patterns version {d.get('version') or '-'}  signer {d.get('signer') or '-'}  "
             f"engine {d.get('engine', '?')}  previous {d.get('previous') or '-'}",
             f"from     {d.get('origin') or '-'}",
             f"events {d.get('events', 0)}  dropped {d.get('dropped', 0)}  partials "
             f"{d.get('partials', 0)}  matches {d.get('matches', 0)}  patterns "
             f"{d.get('total', 0)}",
             f"{'NAME':<30} {'SEVERITY':<8} {'RESPONSE':<8} {'STEPS':>5} {'MATCHES':>7} "
             f"{'PARTIAL':>7} TAGS"]
    for p in d.get("patterns") or []:
        lines.append(f"{str(p.get('name'))[:30]:<30} {p.get('severity', '?')!s:<8} "
                     f"{p.get('response', '?')!s:<8} {p.get('steps', 0):>5} "
                     f"{p.get('matches', 0):>7} {p.get('partials', 0):>7} "
                     f"{' '.join(p.get('tags') or [])}")
        if p.get("about"):
            lines.append(f"  {p['about']}")
    alerts = d.get("alerts") or []
    if alerts:
        lines.append("recent alerts:")
        for a in alerts[-10:]:
            cells = ",".join(c or "host" for c in a.get("cells") or [])
            lines.append(f"  {_when(a.get('ts'))} {a.get('severity', '?')!s:<6} "
                         f"{a.get('pattern')} {a.get('response')} cells {cells}")
    for problem in d.get("problems") or []:
        lines.append(f"problem: {problem}")
    return [_clip(x.rstrip()) for x in lines]


def _list(client: Client, name: str | None) -> dict[str, Any]:
    if name is not None:
        result: dict[str, Any] = client.call("patterns", name=name)
        return result
    first: dict[str, Any] = client.call("patterns")
    rows = list(first.get("patterns") or [])
    nxt = first.get("next")
    while nxt is not None:  # a long library comes in pages
        page = client.call("patterns", offset=nxt)
        rows += page.get("patterns") or []
        nxt = page.get("next")
    return {**first, "patterns": rows, "next": None}


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AgentError("E_IO", f"read {what} `{path}`: {exc.strerror or exc}",
                         "agent-patterns build and sign write BUNDLE and BUNDLE.sig"
                         ) from None


def install(client: Client, bundle: Path, sig: Path | None = None) -> dict[str, Any]:
    """Send ``bundle`` and its signature (``BUNDLE.sig`` by default) to agentd."""
    data = _read(bundle, "bundle")
    signature = _read(sig or bundle.with_name(bundle.name + ".sig"), "signature")
    if not data:
        raise AgentError("E_IO", f"`{bundle}` is empty", "give a bundle agent-patterns built")
    result: dict[str, Any] = {}
    for off in range(0, len(data), CHUNK):
        result = client.call("patterns.install", bundle=data[off:off + CHUNK], sig=signature,
                             offset=off, total=len(data))
    return result


def cmd_patterns(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    action = getattr(ns, "action", None) or "list"
    if action == "list":
        d = _list(client, ns.name)
        print(json.dumps(d, indent=2) if ns.json else "\n".join(format_patterns(d)),
              file=out)
        return 0
    if ns.timeout is None:  # agentd checks the whole bundle before it answers
        client.timeout = 120.0
    if action == "install":
        r = install(client, Path(ns.bundle), Path(ns.sig) if ns.sig else None)
        text = (f"loaded version {r.get('version')}, signed by {r.get('signer')}\n"
                f"{r.get('patterns')} patterns: {len(r.get('kept') or [])} kept, "
                f"{len(r.get('added') or [])} added, {len(r.get('changed') or [])} changed, "
                f"{len(r.get('removed') or [])} removed")
    else:
        r = client.call("patterns.rollback")
        text = f"rolled back to version {r.get('version')} ({r.get('patterns')} patterns)"
    print(json.dumps(r, indent=2) if ns.json else "\n".join(map(_clip, text.split("\n"))),
          file=out)
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    sp = sub.add_parser("patterns", parents=[common],
                        help="channel 4's pattern library: list, install, rollback")
    sp.add_argument("--name", help="one pattern, with what it is about")
    sp.set_defaults(func=cmd_patterns)
    acts = sp.add_subparsers(dest="action", metavar="ACTION")
    a = acts.add_parser("list", parents=[common], help="what is loaded (the default)")
    a.add_argument("--name", help="one pattern, with what it is about")
    a = acts.add_parser("install", parents=[common], help="install a signed bundle")
    a.add_argument("bundle", metavar="BUNDLE")
    a.add_argument("--sig", metavar="SIG", help="its signature (default BUNDLE.sig)")
    acts.add_parser("rollback", parents=[common], help="back to the bundle before")
