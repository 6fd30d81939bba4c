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
import os
import sys
from pathlib import Path

from agent.cli.client import DEFAULT_SOCKET
from agent.cli.diagbundle import default_bundle_path, write_bundle
from agent.cli.diagscreen import Sources, screen
from agent.core.args import parse
from agent.core.tty import escape

__all__ = ["cli_main"]



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
        print(escape(f"agentctl: error[E_DIAG]: cannot write `{out}`: {exc.strerror}"),
              file=sys.stderr)
        print("hint: pass --bundle FILE on a writable filesystem", file=sys.stderr)
        return 1
    print(escape(f"{out} ({len(b.members)} files, {len(b.errors)} collector errors)"))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
