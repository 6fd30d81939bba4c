"""``agent-patterns``: compile, sign and check pattern bundles on a build host.

::

    agent-patterns keygen -o KEY                 write KEY (secret) and KEY.pub
    agent-patterns check SRC.pat...              read the patterns, list them
    agent-patterns build SRC.pat... -o BUNDLE --version N [--min-engine V]
    agent-patterns sign BUNDLE --key KEY         name the signer, write BUNDLE.sig
    agent-patterns verify BUNDLE --pubkey PUB... [--sig SIG] [--after N] [--engine V]

Exit codes: 0 ok; 1 an error (a pattern, a bundle, a key, a file), printed as one line
``agent-patterns: error[CODE]: message`` and a hint line (a traceback only with
``--debug``); 2 a usage error.  docs/patterns.md describes the language and the bundle.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from agent import __version__
from agent.core.args import parse
from agent.core.errors import AgentError
from agent.monitor.correlation import bundle as bnd
from agent.monitor.correlation.language import parse_sources
from agent.monitor.correlation.model import ENGINE_VERSION, Pattern

__all__ = ["EXIT_ERROR", "EXIT_OK", "main"]

EXIT_OK, EXIT_ERROR = 0, 1


class FileError(AgentError):
    """A file could not be read or written (code ``E_IO``)."""

    def __init__(self, op: str, path: Path, exc: OSError, hint: str | None = None) -> None:
        super().__init__("E_IO", f"{op} `{path}`: {exc.strerror or exc}", hint)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FileError(f"read {what}", path, exc) from None


def _write(path: Path, data: bytes, mode: int = 0o644, *, new: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (``new``: refuse to replace a file)."""
    if new and path.exists():
        raise AgentError("E_EXISTS", f"`{path}` exists", "remove it first, or choose another "
                         "name: a key is never overwritten")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FileError("write", path, exc) from None


def _patterns(sources: Sequence[str]) -> tuple[Pattern, ...]:
    return parse_sources([(s, _read(Path(s), "patterns").decode("utf-8", "replace"))
                          for s in sources])


def _listing(pats: Sequence[Pattern]) -> list[str]:
    return [f"  {p.name:<28} {len(p.steps)} step{'s' if len(p.steps) > 1 else ' '} "
            f"{p.severity:<6} {p.response:<7} {p.about}"[:79].rstrip() for p in pats]


# --------------------------------------------------------------------------- commands

def _keygen(ns: argparse.Namespace, out: TextIO) -> int:
    secret = os.urandom(32)
    path = Path(ns.output)
    pub = path.with_name(path.name + ".pub")
    _write(path, bnd.key_text("secret", secret).encode(), 0o600, new=True)
    _write(pub, bnd.key_text("public", bnd.public_key(secret)).encode(), new=True)
    print(f"key {bnd.key_id(bnd.public_key(secret))}: secret {path} (keep it off images and "
          f"repositories), public {pub} (pin it in /etc/agent/keys/)", file=out)
    return EXIT_OK


def _check(ns: argparse.Namespace, out: TextIO) -> int:
    pats = _patterns(ns.sources)
    print(f"{len(pats)} patterns, engine {ENGINE_VERSION}", file=out)
    print("\n".join(_listing(pats)), file=out)
    return EXIT_OK


def _build(ns: argparse.Namespace, out: TextIO) -> int:
    pats = _patterns(ns.sources)
    data = bnd.encode(pats, ns.version, ns.min_engine)
    _write(Path(ns.output), data)
    print(f"wrote {ns.output}: version {ns.version}, {len(pats)} patterns, min engine "
          f"{ns.min_engine}, {len(data)} bytes; unsigned: agent-patterns sign {ns.output} "
          "--key KEY", file=out)
    return EXIT_OK


def _sign(ns: argparse.Namespace, out: TextIO) -> int:
    path = Path(ns.bundle)
    secret = bnd.parse_key(_read(Path(ns.key), "key").decode("utf-8", "replace"), "secret",
                           ns.key)
    signer = bnd.key_id(bnd.public_key(secret))
    data = bnd.stamp(_read(path, "bundle"), signer)
    bnd.decode(data)  # sound before it is signed
    sig = Path(ns.output or f"{ns.bundle}.sig")
    _write(path, data)
    _write(sig, bnd.sign(data, secret))
    print(f"signed {path} with key {signer}: {sig}", file=out)
    return EXIT_OK


def _verify(ns: argparse.Namespace, out: TextIO) -> int:
    keys = [bnd.parse_key(_read(Path(k), "public key").decode("utf-8", "replace"), "public",
                          k) for k in ns.pubkey]
    data = _read(Path(ns.bundle), "bundle")
    sig = _read(Path(ns.sig or f"{ns.bundle}.sig"), "signature")
    b = bnd.verify(data, sig, keys, engine_version=ns.engine, after=ns.after)
    if ns.json:
        doc: dict[str, Any] = {"version": b.version, "min_engine": b.min_engine,
                               "signer": b.signer, "digest": b.digest,
                               "patterns": [p.to_wire() for p in b.patterns]}
        print(json.dumps(doc, indent=2), file=out)
        return EXIT_OK
    print(f"{ns.bundle}: good signature by key {b.signer}; version {b.version}, min engine "
          f"{b.min_engine}, {len(b.patterns)} patterns", file=out)
    print("\n".join(_listing(b.patterns)), file=out)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent-patterns", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"agent-patterns {__version__} "
                   f"(engine {ENGINE_VERSION}, bundle format {bnd.FORMAT})")
    p.add_argument("--debug", action="store_true", help="a traceback with an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    k = sub.add_parser("keygen", help="a new signing key: KEY (secret) and KEY.pub")
    k.add_argument("-o", "--output", required=True, metavar="KEY")
    k.set_defaults(func=_keygen)
    c = sub.add_parser("check", help="read pattern files and list their patterns")
    c.add_argument("sources", nargs="+", metavar="SRC.pat")
    c.set_defaults(func=_check)
    b = sub.add_parser("build", help="compile pattern files into an unsigned bundle")
    b.add_argument("sources", nargs="+", metavar="SRC.pat")
    b.add_argument("-o", "--output", required=True, metavar="BUNDLE")
    b.add_argument("--version", type=int, required=True, metavar="N",
                   help="the library's version: agents take only higher ones")
    b.add_argument("--min-engine", type=int, default=ENGINE_VERSION, metavar="V",
                   help=f"the oldest engine that may load it (default {ENGINE_VERSION})")
    b.set_defaults(func=_build)
    s = sub.add_parser("sign", help="name the signer in BUNDLE and write BUNDLE.sig")
    s.add_argument("bundle", metavar="BUNDLE")
    s.add_argument("--key", required=True, metavar="KEY", help="the secret key file")
    s.add_argument("-o", "--output", metavar="SIG", help="default BUNDLE.sig")
    s.set_defaults(func=_sign)
    v = sub.add_parser("verify", help="check a bundle as an agent would")
    v.add_argument("bundle", metavar="BUNDLE")
    v.add_argument("--pubkey", required=True, action="append", metavar="PUB",
                   help="a pinned public key file (repeat for several)")
    v.add_argument("--sig", metavar="SIG", help="default BUNDLE.sig")
    v.add_argument("--engine", type=int, default=ENGINE_VERSION, metavar="V",
                   help=f"the agent's engine version (default {ENGINE_VERSION})")
    v.add_argument("--after", type=int, metavar="N", help="the version loaded now")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_verify)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    ns = parse(_parser(), argv)
    if isinstance(ns, int):
        return ns
    try:
        code: int = ns.func(ns, out or sys.stdout)
        return code
    except AgentError as exc:
        if ns.debug:
            traceback.print_exc()
        print(f"agent-patterns: error[{exc.code}]: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
