"""Sealed file trees: the hash manifest a build writes for an image (pure).

A *seal* lists every regular file and symlink of a tree as it left the build: the file's
SHA-256, size and mode, or the link's target.  Two trees are sealed this way: each cell
image (the exec monitor of channel 1 lets a cell execute only what its image's seal
lists, unchanged), and the agent's own installation (the master checks its files
against it and refuses to re-execute tampered code, issue 12).  The text form is one
entry per line, fields separated by tabs, sorted by path, readable over a serial
console::

    # agent-seal 1
    f	0755	18280	9f86d08...	usr/bin/httpd
    l	../lib/libc.so.6	lib/libc.so

Paths are relative to the tree's root, '/'-separated, without '..' or empty parts; a
path or link target with a newline, tab or NUL is refused (no build makes one, and it
could split a line).  Nothing here reads a file: :mod:`agent.kernel.seal` walks and hashes trees.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.core.errors import ConfigError

__all__ = ["HEADER", "Entry", "Mismatch", "Seal", "SealError", "check_path"]

HEADER = "# agent-seal 1"


class SealError(ConfigError):
    """A seal that cannot be read (``E_SEAL``), naming the line and the fix."""

    def __init__(self, where: str, what: str, hint: str | None = None) -> None:
        super().__init__("E_SEAL", f"{where}: {what}",
                         hint or "rebuild the seal with `agent-seal build` from the image")


def check_path(path: str) -> str:
    """``path`` if it is a clean relative path, else ValueError."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or \
            any(c in path for c in "\n\t\0"):
        raise ValueError(f"not a clean relative path: {path!r}")
    return path


@dataclass(frozen=True)
class Entry:
    """A regular file (``kind`` "f": ``digest`` hex SHA-256, ``size``, ``mode`` permission
    bits) or a symlink (``kind`` "l": ``target``)."""

    path: str
    kind: str
    digest: str = ""
    size: int = 0
    mode: int = 0
    target: str = ""

    def line(self) -> str:
        if self.kind == "f":
            return f"f\t{self.mode:04o}\t{self.size}\t{self.digest}\t{self.path}"
        return f"l\t{self.target}\t{self.path}"


@dataclass(frozen=True)
class Mismatch:
    path: str
    reason: str  # "changed" | "missing" | "unsealed" | "mode" | "kind"


@dataclass(frozen=True)
class Seal:
    entries: Mapping[str, Entry]

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> Seal:
        out: dict[str, Entry] = {}
        for e in entries:
            check_path(e.path)
            out[e.path] = e
        return cls(dict(sorted(out.items())))

    def text(self) -> str:
        return HEADER + "\n" + "".join(e.line() + "\n" for e in self.entries.values())

    @classmethod
    def parse(cls, text: str, source: str = "<seal>") -> Seal:
        lines = text.split("\n")
        if not lines or lines[0] != HEADER:
            raise SealError(f"{source}:1", f"not a seal (first line must be {HEADER!r})")
        out: list[Entry] = []
        for no, line in enumerate(lines[1:], 2):
            if not line:
                continue
            fields = line.split("\t")
            try:
                check_path(fields[-1])
                if fields[0] == "f" and len(fields) == 5:
                    mode, size, digest = int(fields[1], 8), int(fields[2]), fields[3]
                    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                        raise ValueError("the digest is not 64 hex digits")
                    if size < 0 or not 0 <= mode <= 0o7777:
                        raise ValueError("bad size or mode")
                    out.append(Entry(fields[4], "f", digest, size, mode))
                elif fields[0] == "l" and len(fields) == 3 and fields[1] \
                        and "\0" not in fields[1]:
                    out.append(Entry(fields[2], "l", target=fields[1]))
                else:
                    raise ValueError("expected `f<TAB>MODE<TAB>SIZE<TAB>SHA256<TAB>PATH` "
                                     "or `l<TAB>TARGET<TAB>PATH`")
            except ValueError as exc:
                raise SealError(f"{source}:{no}", str(exc)) from None
        return cls.of(out)

    def get(self, path: str) -> Entry | None:
        return self.entries.get(path)

    def compare(self, actual: Seal) -> list[Mismatch]:
        """What differs between this seal (what the build made) and ``actual``."""
        out: list[Mismatch] = []
        for path, want in self.entries.items():
            got = actual.entries.get(path)
            if got is None:
                out.append(Mismatch(path, "missing"))
            elif got.kind != want.kind:
                out.append(Mismatch(path, "kind"))
            elif (got.digest, got.size, got.target) != (want.digest, want.size, want.target):
                out.append(Mismatch(path, "changed"))
            elif got.mode != want.mode:
                out.append(Mismatch(path, "mode"))
        out += [Mismatch(p, "unsealed") for p in actual.entries if p not in self.entries]
        return sorted(out, key=lambda m: m.path)
