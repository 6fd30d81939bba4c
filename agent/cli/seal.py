"""``agent-seal``: the hash manifest of a file tree, made when an image is built and
checked against the tree later (docs/master.md, docs/exec.md).

::

    agent-seal build DIR [-o SEAL] [--skip PATH]...   seal DIR (stdout without -o)
    agent-seal check DIR SEAL [--skip PATH]...        what differs; exit 1 if anything

A firmware build seals each cell image (their writable areas skipped) and the agent's
own installed package (``/usr/share/agent/agent.seal``), after byte-compiling it: the
``.pyc`` files are what runs, so they are sealed too.  Exit codes: 0 ok, 1 an error or
a difference, 2 usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.core.args import parse
from agent.core.errors import AgentError
from agent.core.seal import Seal
from agent.kernel.seal import seal_tree

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent-seal", description="Seal a file tree, or check "
                                "a tree against its seal.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the seal of DIR")
    b.add_argument("dir", type=Path)
    b.add_argument("-o", "--output", type=Path, help="the seal file (default: stdout)")
    c = sub.add_parser("check", help="compare DIR with its SEAL")
    c.add_argument("dir", type=Path)
    c.add_argument("seal", type=Path)
    for s in (b, c):
        s.add_argument("--skip", action="append", default=[], metavar="PATH",
                       help="leave out this relative path (a writable area's mount point)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse(_parser(), argv)
    if isinstance(ns, int):
        return ns
    try:
        tree = seal_tree(ns.dir, skip=tuple(ns.skip))
        if ns.cmd == "build":
            if ns.output is None:
                sys.stdout.write(tree.text())
            else:
                tmp = ns.output.with_name(f".{ns.output.name}.{os.getpid()}")
                tmp.write_text(tree.text())
                os.replace(tmp, ns.output)
            print(f"agent-seal: {len(tree.entries)} entries", file=sys.stderr)
            return 0
        seal = Seal.parse(ns.seal.read_text(), str(ns.seal))
        diff = seal.compare(tree)
        for m in diff:
            print(f"{m.reason:9} {m.path}")
        return 1 if diff else 0
    except AgentError as exc:
        print(f"agent-seal: error[{exc.code}]: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"agent-seal: error[E_IO]: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
